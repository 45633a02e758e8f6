//! Signed, expiring upload tokens: the last path segment of `/upload/<token>`.
//!
//! A token is `<destination>.<expiry>.<mac>`: the destination (`vi/ns/name:uid`) in
//! base64url, the expiry in Unix seconds, and an HMAC-SHA256 over both (base64url, no
//! padding) keyed by the server's secret. Nobody without the key can make a token for
//! another destination or stretch an expiry, and an old URL stops working on its own.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted signing key.
pub const MIN_KEY_LEN: usize = 16;
/// Longest accepted token (a URL segment; anything longer is not ours).
pub const MAX_TOKEN_LEN: usize = 2048;
/// Longest accepted destination.
pub const MAX_DESTINATION_LEN: usize = 512;

/// What is wrong with a token or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The key is too short to be a secret.
    #[error(
        "the signing key is {0} bytes; give at least {MIN_KEY_LEN} random bytes (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    WeakKey(usize),
    /// Not a token this server could have issued.
    #[error(
        "the upload URL carries no valid token ({0}); use the URL exactly as `dvcr-uploader url` printed it"
    )]
    Malformed(&'static str),
    /// Well formed but not signed with this server's key.
    #[error(
        "the upload URL's signature does not match; it was altered or issued by another server, ask for a new upload URL"
    )]
    BadSignature,
    /// Past its expiry.
    #[error("the upload URL expired at {}; ask for a new upload URL", rfc3339(*.0))]
    Expired(u64),
    /// The destination cannot be carried by a token.
    #[error(
        "the destination {0:?} is not usable: write it as repository:tag, e.g. vi/ns/name:uid (at most {MAX_DESTINATION_LEN} characters)"
    )]
    BadDestination(String),
}

impl TokenError {
    /// True for "who are you" (401) rather than "you may not" (403).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, TokenError::Malformed(_))
    }
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Where the upload goes: `repository:tag` in DVCR (e.g. `vi/ns/name:uid`).
    pub destination: String,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
}

/// Issues and checks tokens with one key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { key: <redacted> }")
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn valid_destination(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= MAX_DESTINATION_LEN
        && d.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b':' | b'.' | b'_' | b'-' | b'@')
        })
        && !d.starts_with('/')
}

impl Signer {
    /// A signer with `key` (at least [`MIN_KEY_LEN`] bytes).
    pub fn new(key: &[u8]) -> Result<Self, TokenError> {
        if key.len() < MIN_KEY_LEN {
            return Err(TokenError::WeakKey(key.len()));
        }
        Ok(Self { key: key.to_vec() })
    }

    fn mac(&self, destination: &str, expires_at: u64) -> HmacSha256 {
        // The key length was checked in `new`; HMAC takes keys of any length.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()));
        mac.update(b"dvcr-upload-v1\n");
        mac.update(destination.as_bytes());
        mac.update(b"\n");
        mac.update(expires_at.to_string().as_bytes());
        mac
    }

    /// A token for `destination` valid until `expires`.
    pub fn sign(&self, destination: &str, expires: SystemTime) -> Result<String, TokenError> {
        if !valid_destination(destination) {
            return Err(TokenError::BadDestination(destination.to_owned()));
        }
        let expires_at = unix(expires);
        let tag = self.mac(destination, expires_at).finalize().into_bytes();
        Ok(format!(
            "{}.{expires_at}.{}",
            URL_SAFE_NO_PAD.encode(destination),
            URL_SAFE_NO_PAD.encode(tag)
        ))
    }

    /// Checks `token` at time `now`: well formed, signed by this key, not expired.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(dest), Some(expiry), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three dot-separated parts"));
        };
        let dest = URL_SAFE_NO_PAD
            .decode(dest)
            .map_err(|_| TokenError::Malformed("the destination is not base64url"))?;
        let destination = String::from_utf8(dest)
            .map_err(|_| TokenError::Malformed("the destination is not text"))?;
        let expires_at: u64 = expiry
            .parse()
            .map_err(|_| TokenError::Malformed("the expiry is not a number"))?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed("the signature is not base64url"))?;
        self.mac(&destination, expires_at)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        if !valid_destination(&destination) {
            return Err(TokenError::BadDestination(destination));
        }
        if unix(now) >= expires_at {
            return Err(TokenError::Expired(expires_at));
        }
        Ok(Claims {
            destination,
            expires_at,
        })
    }
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads a signing key from a file (trailing whitespace, such as a final newline, ignored).
pub fn load_key(path: &std::path::Path) -> Result<Signer, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("reading the key file {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    Signer::new(&bytes).map_err(|e| e.to_string())
}

/// Parses `90`, `90s`, `10m`, `1h`, `1d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 90s, 10m or 1h"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(format!("{text:?} has an unknown unit; use s, m, h or d")),
    };
    secs.map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Signs an upload URL for `destination` valid for `ttl`: the JSON answer of
/// `dvcr-uploader url` and of `dvcr serve`'s `POST /upload-urls`
/// (`{"external", "inCluster", "token", "expiresAt"}`; a URL is null without its base).
pub fn mint(
    signer: &Signer,
    destination: &str,
    ttl: std::time::Duration,
    external_base: Option<&str>,
    in_cluster_base: Option<&str>,
) -> Result<serde_json::Value, TokenError> {
    let expires = SystemTime::now() + ttl;
    let token = signer.sign(destination, expires)?;
    let at =
        |base: Option<&str>| base.map(|b| format!("{}/upload/{token}", b.trim_end_matches('/')));
    Ok(serde_json::json!({
        "external": at(external_base),
        "inCluster": at(in_cluster_base),
        "token": token,
        "expiresAt": rfc3339(unix(expires)),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    fn signer() -> Signer {
        Signer::new(b"0123456789abcdef-test-key").unwrap()
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_destination() {
        let now = SystemTime::now();
        let token = signer()
            .sign("vi/ns/disk:uid-1", now + Duration::from_secs(60))
            .unwrap();
        let claims = signer().verify(&token, now).unwrap();
        assert_eq!(claims.destination, "vi/ns/disk:uid-1");
    }

    #[test]
    fn a_token_with_a_changed_destination_or_expiry_is_refused() {
        let now = SystemTime::now();
        let token = signer()
            .sign("vi/ns/disk:uid-1", now + Duration::from_secs(60))
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let other = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("vi/ns/other:uid-1"),
            parts[1],
            parts[2]
        );
        assert_eq!(signer().verify(&other, now), Err(TokenError::BadSignature));
        let later = format!("{}.{}.{}", parts[0], u64::MAX, parts[2]);
        assert_eq!(signer().verify(&later, now), Err(TokenError::BadSignature));
        let other_key = Signer::new(b"another-key-of-16-bytes").unwrap();
        assert_eq!(other_key.verify(&token, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn an_expired_token_names_its_expiry() {
        let now = SystemTime::now();
        let token = signer()
            .sign("vi/ns/disk:uid-1", now - Duration::from_secs(1))
            .unwrap();
        let err = signer().verify(&token, now).unwrap_err();
        assert!(matches!(err, TokenError::Expired(_)));
        assert!(err.to_string().contains("expired at 20"), "{err}");
    }

    #[test]
    fn garbage_is_malformed_and_short_keys_are_refused() {
        let now = SystemTime::now();
        assert!(
            signer()
                .verify("nope", now)
                .unwrap_err()
                .is_unauthenticated()
        );
        assert!(
            signer()
                .verify("a.b.c", now)
                .unwrap_err()
                .is_unauthenticated()
        );
        assert_eq!(Signer::new(b"short").unwrap_err(), TokenError::WeakKey(5));
    }

    #[test]
    fn times_are_printed_as_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
