//! Decompressing through an external program: `gzip -dc` and `lzop -dc`
//! read Proxmox's `.vma.gz` and `.vma.lzo`. The child reads the archive
//! (a file directly; a pipe through a feeder thread that first writes the
//! bytes already read to find the magic), and [`Filter`] reads its
//! output. A child that fails (corrupt or truncated input) is an error at
//! the end of its output, never a silent short read; dropping a
//! [`Filter`] kills and reaps the child.

use std::fs::File;
use std::io::{self, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;

use super::error::ArchiveError;
use super::format::Format;

/// Bytes of the child's stderr kept for the error message.
const MAX_STDERR: u64 = 4096;

/// Where the child reads the compressed archive from.
pub enum FilterInput {
    /// A file, at its start.
    File(File),
    /// Bytes already read from a pipe, then the rest of it.
    Pipe(Vec<u8>, Box<dyn Read + Send>),
}

/// A running decompressor; see the module docs.
pub struct Filter {
    command: &'static str,
    child: Child,
    stdout: ChildStdout,
    stderr: Option<JoinHandle<String>>,
    done: bool,
}

impl Filter {
    /// Starts `tool -dc` on `input`.
    pub fn spawn(
        tool: &'static str,
        format: Format,
        input: FilterInput,
    ) -> Result<Filter, ArchiveError> {
        let command = match tool {
            "gzip" => "gzip -dc",
            "lzop" => "lzop -dc",
            _ => unreachable!("a known decompressor"),
        };
        let (stdin, feed) = match input {
            FilterInput::File(f) => (Stdio::from(f), None),
            FilterInput::Pipe(head, rest) => (Stdio::piped(), Some((head, rest))),
        };
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ArchiveError::MissingTool {
                tool,
                format: format.name(),
                source,
            })?;
        if let Some((head, mut rest)) = feed {
            let mut to_child = child.stdin.take().expect("piped stdin");
            // Ends when the input ends or the child stops reading.
            std::thread::Builder::new()
                .name(format!("{tool}-feed"))
                .spawn(move || {
                    if to_child.write_all(&head).is_ok() {
                        let _ = io::copy(&mut rest, &mut to_child);
                    }
                })?;
        }
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::Builder::new()
            .name(format!("{tool}-stderr"))
            .spawn(move || {
                let mut s = Vec::new();
                let _ = (&mut err).take(MAX_STDERR).read_to_end(&mut s);
                // Drain the rest so the child never blocks on a full pipe.
                let _ = io::copy(&mut err, &mut io::sink());
                String::from_utf8_lossy(&s).into_owned()
            })?;
        let stdout = child.stdout.take().expect("piped stdout");
        Ok(Filter {
            command,
            child,
            stdout,
            stderr: Some(stderr),
            done: false,
        })
    }

    /// Waits for the child at the end of its output: an error unless it
    /// succeeded.
    fn finish(&mut self) -> io::Result<()> {
        self.done = true;
        let status = self.child.wait()?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        Err(ArchiveError::Filter {
            command: self.command,
            status,
            stderr,
        }
        .into())
    }
}

impl Read for Filter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0 {
            self.finish()?;
        }
        Ok(n)
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
