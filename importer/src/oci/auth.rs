//! Registry credentials and challenges: the docker `config.json` the platform mounts
//! (`auths` keyed by host in any of the spellings docker has used, `auth` or
//! `username`/`password`, `identitytoken`), and the `WWW-Authenticate` header a registry
//! answers 401 with (`Basic realm=…` or `Bearer realm=…,service=…,scope=…`).
//!
//! Secrets never reach a message or a log: [`Credential`]'s `Debug` hides them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use super::error::OciError;
use super::reference::is_docker_hub;

/// The largest credentials file read.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// What a registry accepts to prove who we are.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (Basic, or Basic at the token service).
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken`), traded at the token service.
    IdentityToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<hidden>")
                .finish(),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<hidden>)"),
        }
    }
}

/// The credentials of a docker `config.json`, by registry host.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// (host as written, normalised host, credential).
    entries: Vec<(String, String, Credential)>,
    /// The file they came from, for messages.
    source: Option<PathBuf>,
}

#[derive(Deserialize)]
struct ConfigFile {
    auths: Option<HashMap<String, AuthEntry>>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers")]
    cred_helpers: Option<HashMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl AuthConfig {
    /// No credentials at all.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Reads a docker `config.json` (or the older `.dockercfg`, a bare map of hosts).
    pub fn load(path: &Path) -> Result<Self, OciError> {
        use std::io::Read;
        let hint = "give a docker config.json ({\"auths\": {\"host\": {\"auth\": \"base64(user:password)\"}}})";
        let file = std::fs::File::open(path).map_err(|e| {
            OciError::invalid(format!(
                "cannot open the registry credentials {}: {e}; {hint}",
                path.display()
            ))
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| {
                OciError::invalid(format!(
                    "cannot read the registry credentials {}: {e}",
                    path.display()
                ))
            })?;
        if bytes.len() as u64 > MAX_CONFIG_BYTES {
            return Err(OciError::invalid(format!(
                "the registry credentials {} are larger than {MAX_CONFIG_BYTES} bytes; {hint}",
                path.display()
            )));
        }
        let mut config = Self::parse(&bytes).map_err(|e| e.context(path.display()))?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses the text of a docker `config.json`.
    pub fn parse(bytes: &[u8]) -> Result<Self, OciError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            OciError::invalid(format!(
                "the registry credentials are not JSON ({e}); give a docker config.json"
            ))
        })?;
        let auths: HashMap<String, AuthEntry> = if value.get("auths").is_some()
            || value.get("credsStore").is_some()
            || value.get("credHelpers").is_some()
        {
            let file: ConfigFile = serde_json::from_value(value).map_err(|e| {
                OciError::invalid(format!(
                    "the registry credentials do not have the docker config.json shape: {e}"
                ))
            })?;
            if file.creds_store.is_some() || file.cred_helpers.is_some() {
                tracing::warn!(
                    "the docker config names credential helpers; they are not run, only `auths` entries are used"
                );
            }
            file.auths.unwrap_or_default()
        } else {
            // The legacy `.dockercfg` layout: hosts at the top level.
            serde_json::from_value(value).map_err(|e| {
                OciError::invalid(format!(
                    "the registry credentials have no `auths` map and are not a .dockercfg either: {e}"
                ))
            })?
        };
        let mut entries = Vec::new();
        for (key, entry) in auths {
            let credential = entry
                .credential()
                .map_err(|e| OciError::invalid(format!("the credentials for {key:?}: {e}")))?;
            if let Some(credential) = credential {
                entries.push((key.clone(), normalise_key(&key), credential));
            }
        }
        // Exact keys first, so `host` beats `https://host/v1/` when both exist.
        entries.sort_by_key(|(key, host, _)| (key != host, key.clone()));
        Ok(Self {
            entries,
            source: None,
        })
    }

    /// The credential for `registry` (`host[:port]`), if the file has one.
    pub fn lookup(&self, registry: &str) -> Option<&Credential> {
        let registry = registry.to_ascii_lowercase();
        let hub = is_docker_hub(&registry);
        self.entries
            .iter()
            .find(|(_, host, _)| *host == registry || (hub && is_docker_hub(host)))
            .map(|(_, _, c)| c)
    }

    /// Where the credentials came from, for messages.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }
}

impl AuthEntry {
    fn credential(&self) -> Result<Option<Credential>, String> {
        if let Some(token) = self.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credential::IdentityToken(token.to_owned())));
        }
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "`auth` is not base64 of user:password".to_owned())?;
            let text = String::from_utf8(decoded)
                .map_err(|_| "`auth` does not decode to UTF-8 user:password".to_owned())?;
            let Some((username, password)) = text.split_once(':') else {
                return Err("`auth` decodes to text without ':' (want user:password)".into());
            };
            return Ok(Some(Credential::Basic {
                username: username.to_owned(),
                password: password.to_owned(),
            }));
        }
        match (&self.username, &self.password) {
            (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credential::Basic {
                username: u.clone(),
                password: p.clone(),
            })),
            _ => Ok(None),
        }
    }
}

/// The host of a config key: `host`, `https://host`, `http://host/v1/`, `host/path`.
fn normalise_key(key: &str) -> String {
    let key = key.trim();
    let rest = key.split_once("://").map(|(_, rest)| rest).unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest);
    host.to_ascii_lowercase()
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm="…"`.
    Basic,
    /// `Bearer realm="<token URL>",service="…",scope="…"`.
    Bearer {
        /// The token service URL.
        realm: String,
        /// The `service` to ask the token for.
        service: Option<String>,
        /// The scope the registry wants for this request.
        scope: Option<String>,
        /// `insufficient_scope`, `invalid_token`, …
        error: Option<String>,
    },
}

/// The Basic and Bearer challenges in a `WWW-Authenticate` value (others are skipped;
/// malformed text yields what could be read, never a panic).
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let bytes = header.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let is_space = |b: u8| b == b' ' || b == b'\t';
    let is_token = |b: u8| !is_space(b) && b != b',' && b != b'=' && b != b'"';
    loop {
        while i < bytes.len() && (is_space(bytes[i]) || bytes[i] == b',') {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && is_token(bytes[i]) {
            i += 1;
        }
        if start == i {
            break;
        }
        let scheme = String::from_utf8_lossy(&bytes[start..i]).to_ascii_lowercase();
        let mut params: HashMap<String, String> = HashMap::new();
        loop {
            let before = i;
            while i < bytes.len() && (is_space(bytes[i]) || bytes[i] == b',') {
                i += 1;
            }
            let name_start = i;
            while i < bytes.len() && is_token(bytes[i]) {
                i += 1;
            }
            let name_end = i;
            while i < bytes.len() && is_space(bytes[i]) {
                i += 1;
            }
            if name_start == name_end || i >= bytes.len() || bytes[i] != b'=' {
                // Not `name=`: a new challenge starts here (or the text ends).
                if name_start == name_end && i < bytes.len() && bytes[i] == b'=' {
                    // Stray '=' (a token68 tail): skip it.
                    while i < bytes.len() && bytes[i] == b'=' {
                        i += 1;
                    }
                    continue;
                }
                i = if name_start == name_end { i } else { before };
                break;
            }
            i += 1; // '='
            while i < bytes.len() && is_space(bytes[i]) {
                i += 1;
            }
            let mut value = Vec::new();
            if i < bytes.len() && bytes[i] == b'"' {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    value.push(bytes[i]);
                    i += 1;
                }
                i += 1; // closing quote (or past the end)
            } else {
                while i < bytes.len() && bytes[i] != b',' && !is_space(bytes[i]) {
                    value.push(bytes[i]);
                    i += 1;
                }
            }
            let name = String::from_utf8_lossy(&bytes[name_start..name_end]).to_ascii_lowercase();
            params
                .entry(name)
                .or_insert_with(|| String::from_utf8_lossy(&value).into_owned());
            if i >= bytes.len() {
                break;
            }
        }
        match scheme.as_str() {
            "basic" => out.push(Challenge::Basic),
            "bearer" => {
                if let Some(realm) = params.remove("realm").filter(|r| !r.is_empty()) {
                    out.push(Challenge::Bearer {
                        realm,
                        service: params.remove("service"),
                        scope: params.remove("scope"),
                        error: params.remove("error"),
                    });
                }
            }
            _ => {}
        }
        if i >= bytes.len() {
            break;
        }
        // A guard against a loop that makes no progress on odd input.
        if i == start {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn credentials_are_found_under_every_spelling_of_the_host() {
        let config = AuthConfig::parse(
            br#"{"auths": {
                "https://reg.example:5000/v1/": {"auth": "YWxpY2U6czNjcmV0"},
                "http://other.example": {"username": "bob", "password": "pw"},
                "plain.example": {"identitytoken": "tok"},
                "https://index.docker.io/v1/": {"auth": "aHViOmh1Yg=="}
            }}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.lookup("reg.example:5000"),
            Some(&basic("alice", "s3cret"))
        );
        assert_eq!(config.lookup("other.example"), Some(&basic("bob", "pw")));
        assert_eq!(
            config.lookup("plain.example"),
            Some(&Credential::IdentityToken("tok".into()))
        );
        assert_eq!(
            config.lookup("registry-1.docker.io"),
            Some(&basic("hub", "hub"))
        );
        assert_eq!(config.lookup("reg.example"), None);
        let shown = format!("{:?}", config.lookup("reg.example:5000"));
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn a_legacy_dockercfg_and_a_bad_auth_field_are_handled() {
        let legacy = AuthConfig::parse(br#"{"r.example": {"auth": "dTpw"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(legacy.lookup("r.example"), Some(&basic("u", "p")));
        let bad = AuthConfig::parse(br#"{"auths": {"r.example": {"auth": "!!!"}}}"#);
        assert!(bad.is_err());
        assert!(AuthConfig::parse(b"not json").is_err());
    }

    #[test]
    fn bearer_and_basic_challenges_are_read_with_their_parameters() {
        let got = parse_www_authenticate(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        );
        assert_eq!(
            got,
            vec![Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
                error: Some("insufficient_scope".into()),
            }]
        );
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="dvcr""#),
            vec![Challenge::Basic]
        );
        let both = parse_www_authenticate(
            r#"Negotiate abc==, Basic realm="x", Bearer realm=http://t/token , service=s"#,
        );
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(matches!(&both[1], Challenge::Bearer { realm, service, .. }
            if realm == "http://t/token" && service.as_deref() == Some("s")));
    }

    #[test]
    fn odd_challenge_text_never_panics() {
        for text in [
            "",
            "=",
            "Bearer",
            "Bearer realm",
            "Bearer realm=\"",
            "Bearer ,,,=,=\"\\",
            "Basic ===",
            "\u{e9}\u{e9} a=b",
        ] {
            let _ = parse_www_authenticate(text);
        }
    }
}
