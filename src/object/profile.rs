//! The AWS shared configuration files, read as the AWS CLI reads them:
//! the profile `AWS_PROFILE` (else `default`) of `~/.aws/credentials`
//! (`AWS_SHARED_CREDENTIALS_FILE`) for keys, and of `~/.aws/config`
//! (`AWS_CONFIG_FILE`, where it is `[profile NAME]`) for the region and
//! endpoint. Only the plain keys: no SSO, no role chains, no
//! `credential_process`. Environment variables win over both
//! ([`super::store`]).

use std::path::PathBuf;

/// What a profile gives.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    /// `aws_access_key_id`.
    pub access_key_id: Option<String>,
    /// `aws_secret_access_key`.
    pub secret_access_key: Option<String>,
    /// `aws_session_token`.
    pub session_token: Option<String>,
    /// `region`.
    pub region: Option<String>,
    /// `endpoint_url`.
    pub endpoint_url: Option<String>,
}

impl Profile {
    /// The profile from the user's files, if either has it.
    pub fn load() -> Option<Profile> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let name = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let home = var("HOME").map(PathBuf::from);
        let creds = var("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
        let config = var("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
        let read = |p: Option<PathBuf>| p.and_then(|p| std::fs::read_to_string(p).ok());
        let mut found = false;
        let mut out = Profile::default();
        if let Some(text) = read(creds) {
            found |= out.merge(&text, &name);
        }
        if let Some(text) = read(config) {
            let section = if name == "default" {
                name.clone()
            } else {
                format!("profile {name}")
            };
            found |= out.merge(&text, &section);
        }
        found.then_some(out)
    }

    /// Takes the keys of section `[section]` of `text` that are still
    /// unset; true if the section was there.
    fn merge(&mut self, text: &str, section: &str) -> bool {
        let mut inside = false;
        let mut found = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                inside = name.trim() == section;
                found |= inside;
                continue;
            }
            if !inside {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = Some(v.trim().to_string());
            let slot = match k.trim() {
                "aws_access_key_id" => &mut self.access_key_id,
                "aws_secret_access_key" => &mut self.secret_access_key,
                "aws_session_token" => &mut self.session_token,
                "region" => &mut self.region,
                "endpoint_url" => &mut self.endpoint_url,
                _ => continue,
            };
            if slot.is_none() {
                *slot = v;
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_from_both_files() {
        let creds = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\
                     [work]\n# comment\naws_access_key_id = W\naws_secret_access_key = X\n";
        let config = "[default]\nregion = eu-1\n[profile work]\nregion = us-2\n\
                      endpoint_url = http://10.0.0.1:3900\n";
        let mut p = Profile::default();
        assert!(p.merge(creds, "work"));
        assert!(p.merge(config, "profile work"));
        assert_eq!(p.access_key_id.as_deref(), Some("W"));
        assert_eq!(p.secret_access_key.as_deref(), Some("X"));
        assert_eq!(p.region.as_deref(), Some("us-2"));
        assert_eq!(p.endpoint_url.as_deref(), Some("http://10.0.0.1:3900"));
        let mut q = Profile::default();
        assert!(!q.merge(creds, "nope"));
        assert_eq!(q, Profile::default());
    }
}
