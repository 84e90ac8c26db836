//! `extract --format`: drives restored through the export and `qemu-img
//! convert` are byte-identical to raw extraction (`qemu-img compare`),
//! their zero regions stay unallocated, the temporary names and cleanup
//! are raw extraction's, and what cannot be read at random is refused.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{EIGHT, TWO, archives};
use crate::support::*;

/// Bytes `qemu-img map` says hold data in `image` (of `format`).
fn allocated(image: &Path, format: &str) -> u64 {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", format])
            .arg(image),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn qcow2_restores_byte_identical_and_sparse() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    let env = TestEnv::new();
    let a = archives(env.dir.path(), "fmt", TWO);
    for (form, path) in a.forms() {
        let out = env.path(format!("qcow2-{form}"));
        let stdout = env.ok([
            "extract".as_ref(),
            path.as_os_str(),
            out.as_os_str(),
            "--format".as_ref(),
            "qcow2".as_ref(),
            "-v".as_ref(),
        ]);
        let text = String::from_utf8(stdout).unwrap();
        assert!(text.contains("progress 100%"), "{form}: {text}");
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["disk-drive-efidisk0.qcow2", "disk-drive-virtio0.qcow2"],
            "{form}"
        );
        for (name, size) in &a.drives {
            assert!(
                text.contains(&format!(
                    "DEVINFO {}/tmp-disk-{name}.qcow2 {size}",
                    out.display()
                )),
                "{form}: {text}"
            );
            let img = out.join(format!("disk-{name}.qcow2"));
            let expected = a.expected(name);
            assert!(
                images_equal(
                    img.to_str().unwrap(),
                    "qcow2",
                    expected.to_str().unwrap(),
                    "raw"
                ),
                "{form} {name}"
            );
            // holey_data zeroes every fourth cluster: at least those stay
            // unallocated.
            let data = allocated(&img, "qcow2");
            assert!(
                data <= size - size / 4 / 65536 * 65536,
                "{form} {name}: {data} of {size} bytes allocated"
            );
        }
    }
}

#[test]
fn other_formats_subsets_and_refusals() {
    if !require_tools(&["qemu-img", "zstd"]) {
        return;
    }
    let env = TestEnv::new();
    let a = archives(env.dir.path(), "other", EIGHT);
    // vmdk, two of the eight drives, from the seekable .vma.zst.
    let out = env.path("vmdk");
    env.ok([
        "extract".as_ref(),
        a.zst.as_os_str(),
        out.as_os_str(),
        "--format".as_ref(),
        "vmdk".as_ref(),
        "-d".as_ref(),
        "drive-scsi1,drive-scsi6".as_ref(),
    ]);
    for name in ["drive-scsi1", "drive-scsi6"] {
        let img = out.join(format!("disk-{name}.vmdk"));
        let expected = a.expected(name);
        assert!(
            images_equal(
                img.to_str().unwrap(),
                "vmdk",
                expected.to_str().unwrap(),
                "raw"
            ),
            "{name}"
        );
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
    // A zstd stream cannot be served: refused before DIR is made.
    let stream = env.path("stream.vma.zst");
    run_ok(
        Command::new("zstd")
            .args(["-q", "-c"])
            .arg(&a.plain)
            .stdout(std::fs::File::create(&stream).unwrap()),
    );
    let out = env.path("refused");
    let err = env.fails([
        "extract".as_ref(),
        stream.as_os_str(),
        out.as_os_str(),
        "--format".as_ref(),
        "qcow2".as_ref(),
    ]);
    assert!(err.contains("vma-writer convert"), "{err}");
    assert!(!out.exists());
    let err = env.fails([
        "extract".as_ref(),
        a.indexed.as_os_str(),
        out.as_os_str(),
        "--format".as_ref(),
        "qcow2,backing_file=/etc/passwd".as_ref(),
    ]);
    assert!(err.contains("is not an image format name"), "{err}");
    assert!(!out.exists());
    // A format qemu-img does not know: the directory is removed again.
    let err = env.fails([
        "extract".as_ref(),
        a.indexed.as_os_str(),
        out.as_os_str(),
        "--format".as_ref(),
        "nosuchformat".as_ref(),
    ]);
    assert!(
        err.contains("qemu-img convert -O nosuchformat") && err.contains("removed"),
        "{err}"
    );
    assert!(!out.exists());
}
