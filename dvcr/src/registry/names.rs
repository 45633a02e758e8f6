//! Names, tags, digests and request paths, validated before anything touches storage.
//!
//! Repository names may contain `/` (`vi/ns/name`), so a path under `/v2/` is routed by
//! parsing it from the right: the suffix (`/blobs/<digest>`, `/blobs/uploads/<uuid>`,
//! `/manifests/<ref>`, `/tags/list`, `/referrers/<digest>`) can never contain a `/`, so
//! whatever precedes it is the name. Every value returned from here is safe to use as a path
//! component below the storage root: name components start with `[a-z0-9]`, tags cannot start
//! with `.`, digests are lowercase hex of the exact length, upload ids are UUIDs.

use std::fmt;

use thiserror::Error;

/// The longest repository name accepted, in bytes (the spec's practical limit).
pub const MAX_NAME_LEN: usize = 255;

/// Why a name, tag, digest or path was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    /// invalid repository name: {0}
    #[error(
        "invalid repository name {0:?}: components are [a-z0-9]+ joined by '.', '_', '__' or '-', separated by '/', 255 characters at most"
    )]
    Name(String),
    /// invalid tag: {0}
    #[error("invalid tag {0:?}: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")]
    Tag(String),
    /// invalid digest: {0}
    #[error("invalid digest {0:?}: expected sha256:<64 hex> or sha512:<128 hex>")]
    Digest(String),
    /// unsupported digest algorithm: {0}
    #[error("unsupported digest algorithm in {0:?}: only sha256 and sha512 are supported")]
    Algorithm(String),
}

/// A digest algorithm this registry can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// `sha256`, the default of every client.
    Sha256,
    /// `sha512`, allowed by the OCI image spec.
    Sha512,
}

impl Algorithm {
    /// The name used in digests and storage paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// The length of the hex-encoded value.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// The algorithm with this name, if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

/// A validated content digest: `<algorithm>:<lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses and validates `sha256:<64 hex>` or `sha512:<128 hex>` (lowercase, as the OCI
    /// image spec requires for these algorithms).
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| NameError::Digest(s.into()))?;
        // The spec's grammar: algorithm components [a-z0-9]+ joined by [+._-].
        let alg_ok = !alg.is_empty()
            && alg
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !alg_ok {
            return Err(NameError::Digest(s.into()));
        }
        let algorithm = Algorithm::from_name(alg).ok_or_else(|| NameError::Algorithm(s.into()))?;
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(NameError::Digest(s.into()));
        }
        Ok(Self {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// A digest from an algorithm and raw hash bytes.
    pub fn from_bytes(algorithm: Algorithm, hash: &[u8]) -> Self {
        Self {
            algorithm,
            hex: hex::encode(hash),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex value.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// Validates a repository name against the distribution spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most
/// [`MAX_NAME_LEN`] bytes.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let bad = || NameError::Name(name.chars().take(300).collect());
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad());
    }
    for component in name.split('/') {
        if !valid_component(component.as_bytes()) {
            return Err(bad());
        }
    }
    Ok(())
}

/// One path component: alphanumeric runs joined by exactly one separator
/// (`.`, `_`, `__`, or one or more `-`).
fn valid_component(c: &[u8]) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        // An alphanumeric run.
        let start = i;
        while i < c.len() && alnum(c[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == c.len() {
            return true;
        }
        // A separator.
        match c[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < c.len() && c[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < c.len() && c[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// Validates a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), NameError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"._-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(NameError::Tag(tag.chars().take(200).collect()))
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A tag (validated).
    Tag(String),
    /// A digest (validated).
    Digest(Digest),
}

impl Reference {
    /// A digest if the reference contains `:` (tags cannot), else a tag.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            validate_tag(s).map(|()| Reference::Tag(s.to_owned()))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// What a path under `/v2/` addresses, before the parts are validated (the handlers validate,
/// so that each failure gets its own error code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/v2/<name>/tags/list`.
    Tags {
        /// The repository.
        name: &'a str,
    },
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// The repository.
        name: &'a str,
        /// Tag or digest, unvalidated.
        reference: &'a str,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// The repository.
        name: &'a str,
        /// The digest, unvalidated.
        digest: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/`: start an upload.
    StartUpload {
        /// The repository.
        name: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/<id>`: an upload session.
    Upload {
        /// The repository.
        name: &'a str,
        /// The session id, unvalidated.
        id: &'a str,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// The repository.
        name: &'a str,
        /// The subject digest, unvalidated.
        digest: &'a str,
    },
}

/// Routes the part of a (percent-decoded) path after `/v2/`, from the right. `None` when it
/// matches no endpoint.
pub fn route(rest: &str) -> Option<Route<'_>> {
    if rest.is_empty() {
        return Some(Route::Base);
    }
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    // A trailing slash is only meaningful for `blobs/uploads/`.
    let trimmed = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(name) = trimmed.strip_suffix("/blobs/uploads") {
        return non_empty(name).map(|name| Route::StartUpload { name });
    }
    if rest.ends_with('/') {
        return None;
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return non_empty(name).map(|name| Route::Tags { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    if last.is_empty() {
        return None;
    }
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        return non_empty(name).map(|name| Route::Upload { name, id: last });
    }
    let (name, kind) = head.rsplit_once('/')?;
    let name = non_empty(name)?;
    match kind {
        "manifests" => Some(Route::Manifest {
            name,
            reference: last,
        }),
        "blobs" => Some(Route::Blob { name, digest: last }),
        "referrers" => Some(Route::Referrers { name, digest: last }),
        _ => None,
    }
}

fn non_empty(s: &str) -> Option<&str> {
    if s.is_empty() { None } else { Some(s) }
}

/// Decodes `%XX` escapes in a URL path or query component (`+` is left alone in paths).
/// Returns `None` on a malformed escape or when the result is not UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex_val(*b.get(i + 1)?)?;
                let lo = hex_val(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Encodes a query value: everything but unreserved characters is escaped.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses a query string into (key, value) pairs, percent-decoded; malformed pairs are
/// skipped.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_separators_and_segments_are_valid() {
        for n in [
            "a",
            "vi/ns/name",
            "a.b_c__d---e/f0",
            "library/ubuntu",
            "x/y/z/w",
        ] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn names_breaking_the_grammar_are_refused() {
        let long = "a".repeat(256);
        for n in [
            "", "A", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "_a", "..", "a/../b", &long,
        ] {
            assert!(validate_name(n).is_err(), "{n}");
        }
        assert!(validate_name(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!(validate_tag("latest").is_ok());
        assert!(validate_tag("_v1.2-rc").is_ok());
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        assert!(validate_tag(&"a".repeat(129)).is_err());
        assert!(validate_tag(".hidden").is_err());
        assert!(validate_tag("-x").is_err());
        assert!(validate_tag("a/b").is_err());
        assert!(validate_tag("").is_err());
    }

    #[test]
    fn digests_need_a_known_algorithm_and_exact_lowercase_hex() {
        let h = "a".repeat(64);
        assert!(Digest::parse(&format!("sha256:{h}")).is_ok());
        assert!(Digest::parse(&format!("sha512:{}", "0".repeat(128))).is_ok());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(63))).is_err());
        assert!(matches!(
            Digest::parse(&format!("md5:{h}")),
            Err(NameError::Algorithm(_))
        ));
        assert!(Digest::parse("sha256").is_err());
        assert!(Digest::parse("sha256:../../etc").is_err());
    }

    #[test]
    fn paths_are_routed_from_the_right() {
        assert_eq!(route(""), Some(Route::Base));
        assert_eq!(route("_catalog"), Some(Route::Catalog));
        assert_eq!(
            route("vi/ns/name/tags/list"),
            Some(Route::Tags { name: "vi/ns/name" })
        );
        assert_eq!(
            route("a/blobs/manifests/latest"),
            Some(Route::Manifest {
                name: "a/blobs",
                reference: "latest"
            })
        );
        assert_eq!(
            route("a/b/blobs/uploads/"),
            Some(Route::StartUpload { name: "a/b" })
        );
        assert_eq!(
            route("a/b/blobs/uploads"),
            Some(Route::StartUpload { name: "a/b" })
        );
        assert_eq!(
            route("a/blobs/uploads/xyz"),
            Some(Route::Upload {
                name: "a",
                id: "xyz"
            })
        );
        assert_eq!(
            route("a/blobs/sha256:00"),
            Some(Route::Blob {
                name: "a",
                digest: "sha256:00"
            })
        );
        assert_eq!(
            route("a/referrers/sha256:00"),
            Some(Route::Referrers {
                name: "a",
                digest: "sha256:00"
            })
        );
        assert_eq!(route("blobs/sha256:00"), None);
        assert_eq!(route("a/manifests/"), None);
        assert_eq!(route("a/unknown/x"), None);
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query("mount=sha256%3Aab&from=a%2Fb&x");
        assert_eq!(q[0], ("mount".into(), "sha256:ab".into()));
        assert_eq!(q[1], ("from".into(), "a/b".into()));
        assert_eq!(q[2], ("x".into(), String::new()));
        assert_eq!(percent_decode("%zz", false), None);
    }
}
