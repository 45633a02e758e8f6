//! Who may do what: Basic credentials from an htpasswd file, an access policy per repository
//! prefix, and the Docker token protocol (`GET /auth/token`) with HMAC-signed Bearer tokens.
//!
//! The handlers ask one question, [`Auth::authorize`]: may the client behind these headers do
//! these actions on this repository? The answer is the identity, or the complete 401/403
//! response to send back.
//!
//! # Users: the htpasswd file (`--htpasswd`)
//! One `user:hash` per line, as `htpasswd -B` (Apache) writes it; blank lines and lines
//! starting with `#` are skipped. Only bcrypt hashes (`$2y$`, `$2b$`, `$2a$`) are accepted:
//! MD5 (`$apr1$`), SHA-1 (`{SHA}`), crypt and plain-text entries are refused when the file is
//! loaded, naming the line, because they can be brute-forced from a leaked file. The user name
//! `anonymous` is reserved for clients without credentials and refused too.
//!
//! bcrypt is slow on purpose (50-250 ms at the usual costs), and a chunked push is hundreds of
//! requests with the same credentials: a successful verification is remembered for
//! [`VERIFY_CACHE_TTL`], keyed by a keyed SHA-256 of user and password (the password itself is
//! never kept). A miss runs bcrypt in `block_in_place`, so the reactor keeps serving the other
//! connections, and at most [`MAX_CONCURRENT_BCRYPT`] run at once (more gets `429`).
//!
//! # Permissions: the policy file (`--auth-policy`)
//! One rule per line, `subject  repositories  actions`, separated by blanks; `#` starts a
//! comment. A request is allowed when the rules matching its subject and repository together
//! grant every action it needs.
//! - subject: a user name from the htpasswd file, `anonymous` (clients without credentials),
//!   or `*` (everyone, with or without credentials).
//! - repositories: `*` for all of them (also the right to list the catalog); `vi/ns1/` (ends
//!   with `/`) for every repository below `vi/ns1/`; `vi/ns1/*` the same spelled as a glob;
//!   `cvi/disk` (no `/` at the end) for that repository and those below it (`cvi/disk/...`,
//!   never `cvi/diskette`).
//! - actions: a comma-separated list of `pull`, `push`, `delete`, or `*` for all three. Push
//!   does not imply pull: clients read blobs back while pushing, so pushers need `pull,push`.
//!
//! ```text
//! # nodes read everything, each importer writes its namespace, anyone reads cvi/
//! nodes          *         pull
//! importer-ns1   vi/ns1/   pull,push,delete
//! *              cvi/      pull
//! ```
//!
//! Without a policy file, every user of the htpasswd file may do everything. Clients without
//! credentials may do nothing, unless `--anonymous-pull` (an implicit `anonymous * pull` rule)
//! or a policy rule for `anonymous`/`*` says otherwise. Credentials that are sent are always
//! checked: wrong ones get 401 even where anonymous access would be allowed.
//!
//! # Tokens (`--token-realm`, `--token-key`)
//! With a token realm (the public URL of `/auth/token`, e.g.
//! `https://registry.example/auth/token`), 401 answers carry the Docker challenge
//! `WWW-Authenticate: Bearer realm="..",service="..",scope="repository:<name>:<actions>"`, and
//! the token endpoint grants the intersection of the scopes asked for and the ones the policy
//! allows (asking too much is never an error; it yields fewer actions). Without a realm the
//! challenge is `Basic realm="dvcr"`; Basic credentials are accepted in both modes.
//!
//! A token is `<payload>.<mac>`, both base64url without padding: the payload is JSON
//! `{"sub","aud","iat","exp","access":[{"type","name","actions"}]}`, the mac an HMAC-SHA256 of
//! the payload text under the key read from `--token-key` (a file of at least 32 random bytes,
//! e.g. `head -c 32 /dev/urandom > key`). Without a key file an ephemeral random key is made at
//! startup: tokens then die with the process and are not shared between replicas, so a
//! deployment with several replicas or rolling restarts must give them the same key file.
//! Tokens live [`TOKEN_LIFETIME`]; they are checked when a request starts, so a long upload
//! that outlives its token still completes.
//!
//! A Bearer token that lacks the scope a request needs gets 401 with
//! `error="insufficient_scope"` (clients then fetch a new token for the scope in the challenge)
//! when the policy would allow it, and 403 `DENIED` when it would not.

// `issued_at` is written as the upload tokens write their expiry.
use dvcr_uploader::token::rfc3339;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a successful bcrypt verification is remembered.
pub const VERIFY_CACHE_TTL: Duration = Duration::from_secs(120);
/// How many remembered verifications at most (a bound on memory whatever the clients do).
const VERIFY_CACHE_MAX: usize = 4096;
/// How many bcrypt verifications may run at once; more are answered 429 rather than queued,
/// so a flood of wrong passwords cannot take every thread of the server.
pub const MAX_CONCURRENT_BCRYPT: usize = 16;
/// How long a token from the token endpoint is valid.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// The shortest `--token-key` accepted: the HMAC-SHA256 security level.
const MIN_TOKEN_KEY_LEN: usize = 32;
/// Limits on what a client may send, checked before any work.
const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;
const MAX_QUERY_LEN: usize = 16 * 1024;
const MAX_SCOPES: usize = 32;
const MAX_NAME_LEN: usize = 255;
/// The identity of a client without credentials; refused as a user name in htpasswd.
const ANONYMOUS: &str = "anonymous";
/// Domain separation for the token MAC, so the key cannot be used to sign anything else.
const TOKEN_MAC_CONTEXT: &[u8] = b"dvcr-token-v1.";

type HmacSha256 = Hmac<Sha256>;

/// One thing a client may do to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read manifests, tags, blobs and referrers.
    Pull,
    /// Upload blobs and manifests, create tags.
    Push,
    /// Delete manifests, tags and blobs.
    Delete,
}

impl Action {
    /// The name used in scopes and policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }

    const ALL: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    fn bit(self) -> u8 {
        match self {
            Action::Pull => 1,
            Action::Push => 2,
            Action::Delete => 4,
        }
    }
}

/// What a request wants: `repository` is None for `GET /v2/` (ping) and the catalog.
#[derive(Debug, Clone)]
pub struct Access {
    /// The repository name (already validated by the router), or None for registry-wide
    /// endpoints: with no actions that is the ping (any valid identity), with actions it is
    /// the catalog (needs those actions on every repository).
    pub repository: Option<String>,
    /// Every action the request needs.
    pub actions: Vec<Action>,
}

/// The command-line configuration of authentication.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// The htpasswd file of users (bcrypt only). None: no authentication at all.
    pub htpasswd: Option<PathBuf>,
    /// The access policy file (see the module doc). None: users may do everything.
    pub policy: Option<PathBuf>,
    /// Let clients without credentials pull every repository.
    pub anonymous_pull: bool,
    /// The public URL of the token endpoint; enables Bearer challenges and `/auth/token`.
    pub token_realm: Option<String>,
    /// A file with at least 32 random bytes signing tokens; None: an ephemeral key.
    pub token_key: Option<PathBuf>,
    /// The service name in challenges and tokens; empty means `dvcr`.
    pub service: String,
}

/// Why the authentication configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// reading a configuration file failed
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// a line of the htpasswd file is not a usable bcrypt entry
    #[error("{}:{line}: {message}", path.display())]
    Htpasswd {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },
    /// a line of the policy file is malformed
    #[error("{}:{line}: {message}", path.display())]
    Policy {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong and what to do.
        message: String,
    },
    /// the configuration is inconsistent
    #[error("{0}")]
    Config(String),
}

// ---------------------------------------------------------------------------------------------
// Action sets and scopes

/// A set of actions as bits, so that intersection and inclusion are one instruction.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Actions(u8);

impl Actions {
    const NONE: Actions = Actions(0);
    const ALL: Actions = Actions(7);

    fn of(actions: &[Action]) -> Actions {
        Actions(actions.iter().fold(0, |bits, a| bits | a.bit()))
    }

    fn contains(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }

    fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Parses `pull,push`; unknown names are ignored when `lenient` (scopes from clients),
    /// refused otherwise (policy files, where a typo must not silently grant less).
    fn parse(list: &str, lenient: bool) -> Option<Actions> {
        let mut set = Actions::NONE;
        for word in list.split(',') {
            set = set.union(match word.trim() {
                "pull" => Actions(Action::Pull.bit()),
                "push" => Actions(Action::Push.bit()),
                "delete" => Actions(Action::Delete.bit()),
                "*" => Actions::ALL,
                _ if lenient => Actions::NONE,
                _ => return None,
            });
        }
        Some(set)
    }

    fn names(self) -> Vec<&'static str> {
        Action::ALL
            .iter()
            .filter(|a| self.0 & a.bit() != 0)
            .map(|a| a.as_str())
            .collect()
    }
}

impl fmt::Debug for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.names().join(","))
    }
}

/// What a scope or a grant is about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    /// `repository:<name>`.
    Repository(String),
    /// `registry:catalog`: listing every repository.
    Catalog,
}

/// One `type:name:actions` scope of the token protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    resource: Resource,
    actions: Actions,
}

impl Scope {
    /// Parses `repository:<name>:<actions>` (also `repository(plugin):...`) or
    /// `registry:catalog:*`. The name may not hold `:` (repository names never do), so the
    /// string splits at its first and last colon. Anything malformed is None: the caller
    /// grants nothing for it rather than failing the whole request.
    fn parse(text: &str) -> Option<Scope> {
        let (kind, rest) = text.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        let actions = Actions::parse(actions, true)?;
        let kind = kind.split_once('(').map_or(kind, |(k, _)| k);
        match kind {
            "repository" if valid_repository_name(name) => Some(Scope {
                resource: Resource::Repository(name.to_owned()),
                actions,
            }),
            "registry" if name == "catalog" => Some(Scope {
                resource: Resource::Catalog,
                actions,
            }),
            _ => None,
        }
    }
}

/// Whether `name` is an OCI repository name: components of `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
/// separated by `/`, at most 255 characters.
fn valid_repository_name(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return false;
    }
    name.split('/').all(|component| {
        let bytes = component.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
            return false;
        }
        // Every run of separators must be `.`, `_`, `__` or any number of `-`.
        let mut run = String::new();
        for b in bytes {
            if alnum(b) {
                let ok = run.is_empty()
                    || run == "."
                    || run == "_"
                    || run == "__"
                    || run.bytes().all(|c| c == b'-');
                if !ok {
                    return false;
                }
                run.clear();
            } else if matches!(b, b'.' | b'_' | b'-') {
                run.push(*b as char);
            } else {
                return false;
            }
        }
        true
    })
}

// ---------------------------------------------------------------------------------------------
// The htpasswd file

/// The users of an htpasswd file: name → bcrypt hash.
struct Htpasswd {
    users: HashMap<String, String>,
    /// A well-formed hash no password matches, at the highest cost of the file, checked for
    /// unknown users.
    dummy: String,
}

impl Htpasswd {
    fn load(path: &Path) -> Result<Htpasswd, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Htpasswd::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Htpasswd, AuthError> {
        let mut users = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let fail = |message: String| AuthError::Htpasswd {
                path: path.to_owned(),
                line,
                message,
            };
            let entry = raw.trim();
            if entry.is_empty() || entry.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = entry.split_once(':') else {
                return Err(fail(
                    "expected `user:hash` (make entries with `htpasswd -B`)".into(),
                ));
            };
            if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(fail("the user name is empty or holds blanks".into()));
            }
            if user == ANONYMOUS {
                return Err(fail(format!(
                    "the user name `{ANONYMOUS}` is reserved for clients without credentials"
                )));
            }
            if let Some(kind) = refused_hash_kind(hash) {
                return Err(fail(format!(
                    "user `{user}` has a {kind} password hash; only bcrypt is accepted: \
                     recreate the entry with `htpasswd -B`"
                )));
            }
            if let Err(why) = check_bcrypt_hash(hash) {
                return Err(fail(format!(
                    "user `{user}`: malformed bcrypt hash ({why}); recreate the entry with \
                     `htpasswd -B`"
                )));
            }
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(fail(format!("user `{user}` appears twice")));
            }
        }
        let cost = users
            .values()
            .filter_map(|hash| hash.get(4..6)?.parse::<u32>().ok())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        // Salt and hash all zero bits: parses as bcrypt, and no password hashes to it.
        let dummy = format!("$2y${cost:02}${}", ".".repeat(53));
        Ok(Htpasswd { users, dummy })
    }
}

/// Names a hash kind other than bcrypt, so the error says what was found.
fn refused_hash_kind(hash: &str) -> Option<&'static str> {
    if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
        return None;
    }
    Some(if hash.starts_with("$apr1$") {
        "MD5 (apr1)"
    } else if hash.starts_with("{SHA}") {
        "SHA-1"
    } else if hash.starts_with("$1$") {
        "MD5-crypt"
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        "SHA-crypt"
    } else if hash.starts_with("$2x$") {
        "buggy bcrypt ($2x$)"
    } else if hash.starts_with('$') {
        "unknown"
    } else if hash.len() == 13 && hash.bytes().all(is_bcrypt_base64) {
        "DES crypt"
    } else {
        "plain-text"
    })
}

fn is_bcrypt_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'/'
}

/// Checks the shape `$2y$NN$` + 53 characters of bcrypt's base64, cost 4..=31, without
/// running bcrypt (that would cost a verification per user at startup).
fn check_bcrypt_hash(hash: &str) -> Result<(), &'static str> {
    let bytes = hash.as_bytes();
    if bytes.len() != 60 {
        return Err("not 60 characters");
    }
    if bytes[6] != b'$' {
        return Err("no `$` after the cost");
    }
    let cost: u32 = hash[4..6].parse().map_err(|_| "the cost is not a number")?;
    if !(4..=31).contains(&cost) {
        return Err("the cost is not within 4..31");
    }
    if !bytes[7..].iter().all(|b| is_bcrypt_base64(*b)) {
        return Err("salt or hash holds characters outside bcrypt's alphabet");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The verification cache

/// Successful verifications, keyed by HMAC-SHA256(salt, user, password): neither the password
/// nor an unsalted hash of it stays in memory.
struct VerifyCache {
    salt: [u8; 32],
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Instant>>,
}

impl VerifyCache {
    fn new(salt: [u8; 32], ttl: Duration) -> VerifyCache {
        VerifyCache {
            salt,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(&self, user: &str, password: &str, hash: &str) -> [u8; 32] {
        let mut digest = Sha256::new();
        // Length prefixes keep ("ab","c") and ("a","bc") apart; the stored hash is part of the
        // key so a changed password invalidates the entry.
        for part in [
            &self.salt[..],
            user.as_bytes(),
            password.as_bytes(),
            hash.as_bytes(),
        ] {
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part);
        }
        digest.finalize().into()
    }

    fn hit(&self, key: &[u8; 32], now: Instant) -> bool {
        let Ok(entries) = self.entries.lock() else {
            return false;
        };
        entries.get(key).is_some_and(|until| *until > now)
    }

    fn remember(&self, key: [u8; 32], now: Instant) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= VERIFY_CACHE_MAX {
            entries.retain(|_, until| *until > now);
            if entries.len() >= VERIFY_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, now + self.ttl);
    }
}

// ---------------------------------------------------------------------------------------------
// The policy

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    Everyone,
    Anonymous,
    User(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Repositories {
    /// `*`.
    All,
    /// `vi/ns1/` or `vi/ns1/*`: names starting with this text.
    StartingWith(String),
    /// `cvi/disk`: that name and the names below it.
    ThisAndBelow(String),
}

impl Repositories {
    fn parse(text: &str) -> Option<Repositories> {
        if text == "*" {
            return Some(Repositories::All);
        }
        let prefix = text.strip_suffix('*').unwrap_or(text);
        if prefix.is_empty() || prefix.contains('*') {
            return None;
        }
        let trimmed = prefix.trim_end_matches('/');
        if !valid_repository_name(trimmed) {
            return None;
        }
        Some(if prefix.len() != text.len() || prefix.ends_with('/') {
            Repositories::StartingWith(prefix.to_owned())
        } else {
            Repositories::ThisAndBelow(prefix.to_owned())
        })
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Repositories::All => true,
            Repositories::StartingWith(prefix) => name.starts_with(prefix.as_str()),
            Repositories::ThisAndBelow(base) => {
                name == base
                    || name
                        .strip_prefix(base.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    subject: Subject,
    repositories: Repositories,
    actions: Actions,
}

/// Who may do what; see the module doc for the file format.
#[derive(Debug, Default)]
struct Policy {
    /// None: no policy file, every user may do everything.
    rules: Option<Vec<Rule>>,
    /// Rules that hold whatever the file says (`--anonymous-pull`).
    extra: Vec<Rule>,
}

impl Policy {
    fn parse_rules(text: &str, path: &Path) -> Result<Vec<Rule>, AuthError> {
        let mut rules = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let fail = |message: String| AuthError::Policy {
                path: path.to_owned(),
                line: index + 1,
                message,
            };
            let line = raw.split_once('#').map_or(raw, |(before, _)| before);
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            let [subject, repositories, actions] = words[..] else {
                return Err(fail(
                    "expected `subject repositories actions`, e.g. `nodes * pull`".into(),
                ));
            };
            let subject = match subject {
                "*" => Subject::Everyone,
                ANONYMOUS => Subject::Anonymous,
                user => Subject::User(user.to_owned()),
            };
            let Some(repositories) = Repositories::parse(repositories) else {
                return Err(fail(format!(
                    "`{repositories}` is not `*`, a repository name or a prefix such as `vi/ns1/`"
                )));
            };
            let actions = match Actions::parse(actions, false) {
                Some(set) if !set.is_empty() => set,
                _ => {
                    return Err(fail(format!(
                        "`{actions}` is not a comma-separated list of pull, push, delete or *"
                    )));
                }
            };
            rules.push(Rule {
                subject,
                repositories,
                actions,
            });
        }
        Ok(rules)
    }

    fn rules_for<'a>(&'a self, identity: &'a Identity) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .flatten()
            .chain(self.extra.iter())
            .filter(move |rule| match (&rule.subject, identity) {
                (Subject::Everyone, _) => true,
                (Subject::Anonymous, Identity::Anonymous) => true,
                (Subject::User(u), Identity::User(name)) => u == name,
                _ => false,
            })
    }

    /// The actions `identity` may do on `resource`.
    fn allowed(&self, identity: &Identity, resource: &Resource) -> Actions {
        if self.rules.is_none() && matches!(identity, Identity::User(_)) {
            return Actions::ALL;
        }
        self.rules_for(identity)
            .filter(|rule| match resource {
                Resource::Repository(name) => rule.repositories.matches(name),
                Resource::Catalog => rule.repositories == Repositories::All,
            })
            .fold(Actions::NONE, |set, rule| set.union(rule.actions))
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iat: u64,
    exp: u64,
    access: Vec<Grant>,
}

/// One resource of a token, in the shape of Docker's token claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Grant {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

impl Grant {
    fn from_scope(scope: &Scope) -> Grant {
        let (kind, name) = match &scope.resource {
            Resource::Repository(name) => ("repository", name.as_str()),
            Resource::Catalog => ("registry", "catalog"),
        };
        Grant {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: scope
                .actions
                .names()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }

    fn covers(&self, resource: &Resource) -> bool {
        match resource {
            Resource::Repository(name) => self.kind == "repository" && &self.name == name,
            Resource::Catalog => self.kind == "registry" && self.name == "catalog",
        }
    }

    fn actions(&self) -> Actions {
        Actions::parse(&self.actions.join(","), true).unwrap_or(Actions::NONE)
    }
}

/// Signs and checks tokens with one HMAC-SHA256 key.
struct TokenKey(Vec<u8>);

impl TokenKey {
    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length; the error branch cannot happen, and an empty MAC
        // key would only make every token invalid, never valid.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()));
        mac.update(TOKEN_MAC_CONTEXT);
        mac
    }

    fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let payload = URL_SAFE_NO_PAD.encode(json);
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The claims of a token whose MAC is right, whose audience is `service` and which has
    /// not expired at `now` (seconds since the epoch).
    fn verify(&self, token: &str, service: &str, now: u64) -> Result<Claims, &'static str> {
        if token.len() > MAX_AUTHORIZATION_LEN {
            return Err("token too long");
        }
        let (payload, tag) = token.split_once('.').ok_or("malformed token")?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| "malformed token signature")?;
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag).map_err(|_| "bad token signature")?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| "malformed token payload")?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| "malformed token claims")?;
        if claims.aud != service {
            return Err("token issued for another service");
        }
        if claims.exp <= now {
            return Err("token expired");
        }
        Ok(claims)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    tokio_rustls::rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Requests

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    Anonymous,
    User(String),
}

impl Identity {
    fn name(&self) -> &str {
        match self {
            Identity::Anonymous => ANONYMOUS,
            Identity::User(name) => name,
        }
    }
}

/// What the Authorization header holds.
enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
    Malformed(&'static str),
}

fn credentials(headers: &HeaderMap) -> Credentials {
    let mut values = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Credentials::None;
    };
    if values.next().is_some() {
        return Credentials::Malformed("more than one Authorization header");
    }
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Credentials::Malformed("Authorization header too long");
    }
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed("Authorization header is not ASCII");
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = STANDARD.decode(rest) else {
            return Credentials::Malformed("Basic credentials are not base64");
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return Credentials::Malformed("Basic credentials are not UTF-8");
        };
        match decoded.split_once(':') {
            Some((user, password)) => Credentials::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            },
            None => Credentials::Malformed("Basic credentials lack a `:`"),
        }
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Credentials::Bearer(rest.to_owned())
    } else {
        Credentials::Malformed("unsupported Authorization scheme")
    }
}

/// Decodes `%XX` and `+` of a query component; None for bad escapes or non-UTF-8 results.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The scopes asked for in a token request: every `scope` parameter, each possibly a
/// space-separated list. Malformed scopes are dropped (they are granted nothing); None when
/// the query itself is unusable (too long, too many scopes).
fn requested_scopes(query: &str) -> Option<Vec<Scope>> {
    if query.len() > MAX_QUERY_LEN {
        return None;
    }
    let mut scopes: Vec<Scope> = Vec::new();
    let mut count = 0;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "scope" {
            continue;
        }
        let Some(value) = percent_decode(value) else {
            continue;
        };
        for text in value.split_whitespace() {
            count += 1;
            if count > MAX_SCOPES {
                return None;
            }
            let Some(scope) = Scope::parse(text) else {
                tracing::debug!(scope = text, "ignoring a malformed scope");
                continue;
            };
            match scopes.iter_mut().find(|s| s.resource == scope.resource) {
                Some(same) => same.actions = same.actions.union(scope.actions),
                None => scopes.push(scope),
            }
        }
    }
    Some(scopes)
}

// ---------------------------------------------------------------------------------------------
// Responses

const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

fn error_body(code: &str, message: &str, detail: serde_json::Value) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": detail }] })
        .to_string()
}

fn json_response(status: StatusCode, mut headers: HeaderMap, body: String) -> Response {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    (status, headers, body).into_response()
}

/// Quotes a value for a challenge parameter (`\` and `"` escaped, controls dropped).
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The scope string for a challenge or an error detail: `repository:vi/ns1/x:pull,push`.
fn scope_text(resource: &Resource, actions: Actions) -> String {
    match resource {
        Resource::Repository(name) => {
            format!("repository:{name}:{}", actions.names().join(","))
        }
        Resource::Catalog => "registry:catalog:*".to_owned(),
    }
}

fn access_detail(resource: Option<&Resource>, actions: Actions) -> serde_json::Value {
    let Some(resource) = resource else {
        return serde_json::Value::Null;
    };
    let (kind, name) = match resource {
        Resource::Repository(name) => ("repository", name.as_str()),
        Resource::Catalog => ("registry", "catalog"),
    };
    actions
        .names()
        .into_iter()
        .map(|action| serde_json::json!({ "Type": kind, "Name": name, "Action": action }))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Auth

/// The authentication state of a server: open, or users with a policy and tokens.
#[derive(Debug)]
pub struct Auth {
    secured: Option<Box<Secured>>,
}

struct Secured {
    users: Htpasswd,
    policy: Policy,
    realm: Option<String>,
    service: String,
    key: TokenKey,
    cache: VerifyCache,
    bcrypt_running: AtomicUsize,
}

impl fmt::Debug for Secured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the hashes nor the key.
        f.debug_struct("Secured")
            .field("users", &self.users.users.len())
            .field("policy", &self.policy)
            .field("realm", &self.realm)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// How a request failed to authenticate or authorize.
enum Refusal {
    /// 401 with a challenge; `error` is the Bearer `error=` parameter.
    Unauthorized {
        message: String,
        error: Option<&'static str>,
    },
    /// 403: authenticated, but not allowed.
    Denied(String),
    /// 429: too many password checks at once.
    Busy,
}

impl Auth {
    /// No auth configured: everything allowed.
    pub fn open() -> Self {
        Auth { secured: None }
    }

    /// Loads the htpasswd file, the policy and the token key. Without an htpasswd file the
    /// registry is open (and the other settings, which need users, are refused).
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let Some(htpasswd) = &config.htpasswd else {
            if config.policy.is_some() || config.anonymous_pull || config.token_realm.is_some() {
                return Err(AuthError::Config(
                    "--auth-policy, --anonymous-pull and --token-realm need --htpasswd \
                     (without users the registry is open to everyone)"
                        .into(),
                )
                .into());
            }
            return Ok(Auth::open());
        };
        let users = Htpasswd::load(htpasswd)?;
        if users.users.is_empty() {
            tracing::warn!(file = %htpasswd.display(), "the htpasswd file has no users");
        }
        let mut policy = Policy::default();
        if let Some(path) = &config.policy {
            let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
                path: path.clone(),
                source,
            })?;
            let rules = Policy::parse_rules(&text, path)?;
            for rule in &rules {
                if let Subject::User(user) = &rule.subject
                    && !users.users.contains_key(user)
                {
                    tracing::warn!(user, policy = %path.display(), "policy names a user the htpasswd file does not have");
                }
            }
            policy.rules = Some(rules);
        }
        if config.anonymous_pull {
            policy.extra.push(Rule {
                subject: Subject::Anonymous,
                repositories: Repositories::All,
                actions: Actions(Action::Pull.bit()),
            });
        }
        let service = if config.service.is_empty() {
            "dvcr".to_owned()
        } else {
            config.service.clone()
        };
        for (what, value) in [
            ("--token-realm", config.token_realm.as_deref()),
            ("service", Some(&service)),
        ] {
            if let Some(value) = value
                && (value.is_empty()
                    || value
                        .chars()
                        .any(|c| c == '"' || c == '\\' || c.is_control()))
            {
                return Err(AuthError::Config(format!(
                    "{what} `{value}` is empty or holds quotes, backslashes or control characters"
                ))
                .into());
            }
        }
        let key = match &config.token_key {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
                    path: path.clone(),
                    source,
                })?;
                if bytes.len() < MIN_TOKEN_KEY_LEN {
                    return Err(AuthError::Config(format!(
                        "token key {} has {} bytes; it needs at least {MIN_TOKEN_KEY_LEN} random \
                         bytes (e.g. `head -c 32 /dev/urandom > key`)",
                        path.display(),
                        bytes.len()
                    ))
                    .into());
                }
                TokenKey(bytes)
            }
            None => TokenKey(random_bytes::<32>()?.to_vec()),
        };
        Ok(Auth {
            secured: Some(Box::new(Secured {
                users,
                policy,
                realm: config.token_realm.clone(),
                service,
                key,
                cache: VerifyCache::new(random_bytes::<32>()?, VERIFY_CACHE_TTL),
                bcrypt_running: AtomicUsize::new(0),
            })),
        })
    }

    /// Ok(identity) (a user name, or "anonymous") when the request may do `access`;
    /// Err(response) is the complete 401 (with WWW-Authenticate Basic or Bearer, and the OCI
    /// `UNAUTHORIZED` JSON body) or 403 (`DENIED`) to send back.
    // The handlers return the refusal as it is; boxing it would only move the allocation.
    #[allow(clippy::result_large_err)]
    pub fn authorize(&self, headers: &HeaderMap, access: &Access) -> Result<String, Response> {
        let Some(secured) = &self.secured else {
            return Ok(ANONYMOUS.to_owned());
        };
        let resource = match &access.repository {
            Some(name) => Some(Resource::Repository(name.clone())),
            None if access.actions.is_empty() => None,
            None => Some(Resource::Catalog),
        };
        let wanted = Actions::of(&access.actions);
        secured
            .authorize(headers, resource.as_ref(), wanted, unix_now())
            .map_err(|refusal| secured.refusal_response(refusal, resource.as_ref(), wanted))
    }

    /// Whether the token endpoint is enabled (then core mounts `GET /auth/token`).
    pub fn has_token_endpoint(&self) -> bool {
        self.secured.as_ref().is_some_and(|s| s.realm.is_some())
    }

    /// `GET /auth/token?service=..&scope=repository:<name>:pull,push` with Basic credentials
    /// (or none, for anonymous pull): the Docker token protocol answer.
    pub fn token(&self, headers: &HeaderMap, query: &str) -> Response {
        match self.secured.as_deref() {
            Some(secured) if secured.realm.is_some() => secured.token(headers, query, unix_now()),
            _ => json_response(
                StatusCode::NOT_FOUND,
                HeaderMap::new(),
                error_body(
                    "UNSUPPORTED",
                    "this registry has no token endpoint",
                    serde_json::Value::Null,
                ),
            ),
        }
    }
}

impl Secured {
    /// Checks a user's password: the cache first, bcrypt on a miss.
    fn check_password(&self, user: &str, password: &str) -> Result<bool, Refusal> {
        // An unknown user costs a bcrypt too, so that timing does not tell which names exist.
        let (hash, known) = match self.users.users.get(user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.users.dummy.as_str(), false),
        };
        let key = self.cache.key(user, password, hash);
        if self.cache.hit(&key, Instant::now()) {
            return Ok(true);
        }
        if self.bcrypt_running.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT_BCRYPT {
            self.bcrypt_running.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Busy);
        }
        let run = || bcrypt::verify(password, hash).unwrap_or(false);
        // On the multi-threaded runtime, block_in_place hands this worker's other tasks to
        // another thread for the duration of bcrypt; elsewhere (tests) run it inline.
        let ok = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        };
        self.bcrypt_running.fetch_sub(1, Ordering::AcqRel);
        let ok = ok && known;
        if ok {
            self.cache.remember(key, Instant::now());
        }
        Ok(ok)
    }

    /// Authenticates Basic credentials or none; a refusal for wrong ones.
    fn identify(&self, user: &str, password: &str) -> Result<Identity, Refusal> {
        if self.check_password(user, password)? {
            Ok(Identity::User(user.to_owned()))
        } else {
            Err(Refusal::Unauthorized {
                message: "wrong user name or password".into(),
                error: None,
            })
        }
    }

    fn authorize(
        &self,
        headers: &HeaderMap,
        resource: Option<&Resource>,
        wanted: Actions,
        now: u64,
    ) -> Result<String, Refusal> {
        let (identity, token_grants) = match credentials(headers) {
            Credentials::None => (Identity::Anonymous, None),
            Credentials::Basic { user, password } => (self.identify(&user, &password)?, None),
            Credentials::Bearer(token) => {
                let claims = self.key.verify(&token, &self.service, now).map_err(|why| {
                    Refusal::Unauthorized {
                        message: why.into(),
                        error: Some("invalid_token"),
                    }
                })?;
                let identity = if claims.sub == ANONYMOUS {
                    Identity::Anonymous
                } else {
                    Identity::User(claims.sub)
                };
                (identity, Some(claims.access))
            }
            Credentials::Malformed(why) => {
                return Err(Refusal::Unauthorized {
                    message: why.into(),
                    error: Some("invalid_request"),
                });
            }
        };
        let Some(resource) = resource else {
            // The ping: any authenticated client (a token, even anonymous, counts), but a
            // client without credentials gets the challenge that tells it how to log in.
            return match (&identity, &token_grants) {
                (Identity::Anonymous, None) => Err(Refusal::Unauthorized {
                    message: "authentication required".into(),
                    error: None,
                }),
                _ => Ok(identity.name().to_owned()),
            };
        };
        let by_policy = self.policy.allowed(&identity, resource);
        let allowed = match &token_grants {
            None => by_policy,
            Some(grants) => grants
                .iter()
                .filter(|g| g.covers(resource))
                .fold(Actions::NONE, |set, g| set.union(g.actions())),
        };
        if allowed.contains(wanted) {
            return Ok(identity.name().to_owned());
        }
        match identity {
            // A token lacking a scope the policy allows: the client fetches a better token.
            _ if token_grants.is_some() && by_policy.contains(wanted) => {
                Err(Refusal::Unauthorized {
                    message: "the token does not grant this access".into(),
                    error: Some("insufficient_scope"),
                })
            }
            Identity::Anonymous => Err(Refusal::Unauthorized {
                message: "authentication required".into(),
                error: token_grants.as_ref().map(|_| "insufficient_scope"),
            }),
            Identity::User(user) => Err(Refusal::Denied(format!(
                "user `{user}` may not {} `{}`",
                wanted.intersect(Actions(!by_policy.0)).names().join(","),
                match resource {
                    Resource::Repository(name) => name.as_str(),
                    Resource::Catalog => "the catalog",
                }
            ))),
        }
    }

    fn challenge(
        &self,
        resource: Option<&Resource>,
        wanted: Actions,
        error: Option<&str>,
    ) -> String {
        match &self.realm {
            None => "Basic realm=\"dvcr\"".to_owned(),
            Some(realm) => {
                let mut challenge = format!(
                    "Bearer realm={},service={}",
                    quoted(realm),
                    quoted(&self.service)
                );
                if let Some(resource) = resource {
                    challenge.push_str(",scope=");
                    challenge.push_str(&quoted(&scope_text(resource, wanted)));
                }
                if let Some(error) = error {
                    challenge.push_str(",error=");
                    challenge.push_str(&quoted(error));
                }
                challenge
            }
        }
    }

    fn refusal_response(
        &self,
        refusal: Refusal,
        resource: Option<&Resource>,
        wanted: Actions,
    ) -> Response {
        let detail = access_detail(resource, wanted);
        match refusal {
            Refusal::Unauthorized { message, error } => {
                let mut headers = HeaderMap::new();
                let challenge = self.challenge(resource, wanted, error);
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    headers.insert(WWW_AUTHENTICATE, value);
                }
                json_response(
                    StatusCode::UNAUTHORIZED,
                    headers,
                    error_body("UNAUTHORIZED", &message, detail),
                )
            }
            Refusal::Denied(message) => json_response(
                StatusCode::FORBIDDEN,
                HeaderMap::new(),
                error_body("DENIED", &message, detail),
            ),
            Refusal::Busy => {
                let mut headers = HeaderMap::new();
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
                json_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    headers,
                    error_body(
                        "TOOMANYREQUESTS",
                        "too many password checks at once; retry shortly",
                        serde_json::Value::Null,
                    ),
                )
            }
        }
    }

    fn token(&self, headers: &HeaderMap, query: &str, now: u64) -> Response {
        let identity = match credentials(headers) {
            Credentials::None => Ok(Identity::Anonymous),
            Credentials::Basic { user, password } => self.identify(&user, &password),
            Credentials::Bearer(_) | Credentials::Malformed(_) => Err(Refusal::Unauthorized {
                message: "the token endpoint takes Basic credentials or none".into(),
                error: None,
            }),
        };
        let identity = match identity {
            Ok(identity) => identity,
            Err(Refusal::Unauthorized { message, .. }) => {
                let mut headers = HeaderMap::new();
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"dvcr\""),
                );
                return json_response(
                    StatusCode::UNAUTHORIZED,
                    headers,
                    error_body("UNAUTHORIZED", &message, serde_json::Value::Null),
                );
            }
            Err(other) => return self.refusal_response(other, None, Actions::NONE),
        };
        let Some(scopes) = requested_scopes(query) else {
            return json_response(
                StatusCode::BAD_REQUEST,
                HeaderMap::new(),
                error_body(
                    "UNSUPPORTED",
                    &format!(
                        "the query is longer than {MAX_QUERY_LEN} bytes or asks for more than {MAX_SCOPES} scopes"
                    ),
                    serde_json::Value::Null,
                ),
            );
        };
        let access: Vec<Grant> = scopes
            .iter()
            .filter_map(|scope| {
                let granted = scope
                    .actions
                    .intersect(self.policy.allowed(&identity, &scope.resource));
                (!granted.is_empty()).then(|| {
                    Grant::from_scope(&Scope {
                        resource: scope.resource.clone(),
                        actions: granted,
                    })
                })
            })
            .collect();
        let claims = Claims {
            sub: identity.name().to_owned(),
            aud: self.service.clone(),
            iat: now,
            exp: now + TOKEN_LIFETIME.as_secs(),
            access,
        };
        let token = self.key.sign(&claims);
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME.as_secs(),
            "issued_at": rfc3339(now),
        });
        let mut headers = HeaderMap::new();
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        json_response(StatusCode::OK, headers, body.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/dvcr/htpasswd";

    fn bcrypt_entry(user: &str, password: &str) -> String {
        format!("{user}:{}", bcrypt::hash(password, 4).unwrap())
    }

    fn secured(htpasswd: &str, policy: Option<&str>, realm: Option<&str>) -> Secured {
        let users = Htpasswd::parse(htpasswd, Path::new(FILE)).unwrap();
        let rules = policy.map(|p| Policy::parse_rules(p, Path::new("policy")).unwrap());
        Secured {
            users,
            policy: Policy {
                rules,
                extra: Vec::new(),
            },
            realm: realm.map(str::to_owned),
            service: "dvcr".into(),
            key: TokenKey(vec![7; 32]),
            cache: VerifyCache::new([1; 32], VERIFY_CACHE_TTL),
            bcrypt_running: AtomicUsize::new(0),
        }
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&value).unwrap(),
        );
        headers
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    fn repo(name: &str) -> Option<Resource> {
        Some(Resource::Repository(name.into()))
    }

    fn set(list: &str) -> Actions {
        Actions::parse(list, false).unwrap()
    }

    fn body_json(response: Response) -> (StatusCode, HeaderMap, serde_json::Value) {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = futures_util::FutureExt::now_or_never(axum::body::to_bytes(
            response.into_body(),
            1 << 20,
        ))
        .unwrap()
        .unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn an_htpasswd_file_with_bcrypt_entries_of_every_prefix_loads() {
        let y = "$2y$05$cZ8vBTqPyZS8v/cl1v7Jf.4QwA/3bN0ZrNl8iqVHoDQxZGvK9YuIa";
        let b = y.replacen("$2y$", "$2b$", 1);
        let a = y.replacen("$2y$", "$2a$", 1);
        let text = format!("# users\n\nalice:{y}\n  bob:{b}  \ncarol:{a}\n");
        let users = Htpasswd::parse(&text, Path::new(FILE)).unwrap();
        assert_eq!(users.users.len(), 3);
        assert_eq!(users.users["bob"], b);
    }

    #[test]
    fn other_hash_kinds_are_refused_naming_the_file_line_and_kind() {
        let good = bcrypt_entry("ok", "x");
        for (entry, kind) in [
            ("md5:$apr1$abcdefgh$0123456789abcdefghijkl", "MD5 (apr1)"),
            ("sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("des:abJnggxhB/yWI", "DES crypt"),
            ("plain:secret", "plain-text"),
            ("sha512:$6$salt$hash", "SHA-crypt"),
            ("md5crypt:$1$salt$hash", "MD5-crypt"),
        ] {
            let text = format!("{good}\n{entry}\n");
            let message = Htpasswd::parse(&text, Path::new(FILE))
                .err()
                .unwrap()
                .to_string();
            assert!(message.starts_with(&format!("{FILE}:2:")), "{message}");
            assert!(message.contains(kind), "{message}");
            assert!(message.contains("htpasswd -B"), "{message}");
        }
    }

    #[test]
    fn malformed_bcrypt_entries_duplicates_and_the_anonymous_name_are_refused() {
        for text in [
            "short:$2y$05$abc".to_owned(),
            "cost:$2y$99$cZ8vBTqPyZS8v/cl1v7Jf.4QwA/3bN0ZrNl8iqVHoDQxZGvK9YuIa".to_owned(),
            "nocolon".to_owned(),
            bcrypt_entry("anonymous", "x"),
            format!(
                "{}\n{}",
                bcrypt_entry("twice", "a"),
                bcrypt_entry("twice", "b")
            ),
        ] {
            assert!(
                Htpasswd::parse(&text, Path::new(FILE)).is_err(),
                "accepted {text}"
            );
        }
    }

    #[test]
    fn a_right_password_verifies_and_a_wrong_one_does_not() {
        let s = secured(&bcrypt_entry("alice", "s3cret:with colon"), None, None);
        assert!(s.check_password("alice", "s3cret:with colon").ok().unwrap());
        assert!(!s.check_password("alice", "wrong").ok().unwrap());
        assert!(
            !s.check_password("mallory", "s3cret:with colon")
                .ok()
                .unwrap()
        );
        assert!(!s.check_password("mallory", "").ok().unwrap());
        assert!(check_bcrypt_hash(&s.users.dummy).is_ok());
        assert!(bcrypt::verify("", &s.users.dummy).is_ok());
    }

    #[test]
    fn a_successful_verification_is_cached_and_a_failed_one_is_not() {
        let s = secured(&bcrypt_entry("alice", "pw"), None, None);
        let hash = s.users.users["alice"].clone();
        let key = s.cache.key("alice", "pw", &hash);
        assert!(!s.cache.hit(&key, Instant::now()));
        assert!(s.check_password("alice", "pw").ok().unwrap());
        assert!(s.cache.hit(&key, Instant::now()));
        assert!(!s.cache.hit(
            &key,
            Instant::now() + VERIFY_CACHE_TTL + Duration::from_secs(1)
        ));
        let wrong = s.cache.key("alice", "nope", &hash);
        assert!(!s.check_password("alice", "nope").ok().unwrap());
        assert!(!s.cache.hit(&wrong, Instant::now()));
        // The parts are length-prefixed: moving a byte from user to password changes the key.
        assert_ne!(s.cache.key("ab", "c", &hash), s.cache.key("a", "bc", &hash));
    }

    #[test]
    fn a_cache_hit_is_much_faster_than_bcrypt() {
        let s = secured(
            &format!("alice:{}", bcrypt::hash("pw", 10).unwrap()),
            None,
            None,
        );
        let start = Instant::now();
        assert!(s.check_password("alice", "pw").ok().unwrap());
        let first = start.elapsed();
        let start = Instant::now();
        for _ in 0..100 {
            assert!(s.check_password("alice", "pw").ok().unwrap());
        }
        assert!(
            start.elapsed() < first,
            "100 hits took longer than one bcrypt"
        );
    }

    #[test]
    fn too_many_password_checks_at_once_get_429_but_cache_hits_do_not() {
        let s = secured(&bcrypt_entry("alice", "pw"), None, None);
        assert!(s.check_password("alice", "pw").ok().unwrap());
        s.bcrypt_running
            .store(MAX_CONCURRENT_BCRYPT, Ordering::SeqCst);
        assert!(s.check_password("alice", "pw").ok().unwrap());
        let refusal = s.check_password("alice", "other").err().unwrap();
        let (status, headers, body) = body_json(s.refusal_response(refusal, None, Actions::NONE));
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[RETRY_AFTER], "1");
        assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
        assert_eq!(
            s.bcrypt_running.load(Ordering::SeqCst),
            MAX_CONCURRENT_BCRYPT
        );
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = VerifyCache::new([0; 32], VERIFY_CACHE_TTL);
        let now = Instant::now();
        for i in 0..VERIFY_CACHE_MAX + 10 {
            cache.remember(cache.key(&i.to_string(), "p", "h"), now);
        }
        assert!(cache.entries.lock().unwrap().len() <= VERIFY_CACHE_MAX);
    }

    #[test]
    fn policy_rules_match_repositories_by_prefix() {
        let rules = Policy::parse_rules(
            "# comment\nnodes * pull\nimporter-ns1 vi/ns1/ pull,push,delete # trailing\n\
             * cvi/ pull\nglob vi/ns2* push\nexact cvi/disk pull\n",
            Path::new("policy"),
        )
        .unwrap();
        let policy = Policy {
            rules: Some(rules),
            extra: Vec::new(),
        };
        let user = |u: &str| Identity::User(u.into());
        let r = |n: &str| Resource::Repository(n.into());
        assert_eq!(policy.allowed(&user("nodes"), &r("vi/ns9/x")), set("pull"));
        assert_eq!(
            policy.allowed(&user("importer-ns1"), &r("vi/ns1/x")),
            Actions::ALL
        );
        assert_eq!(
            policy.allowed(&user("importer-ns1"), &r("vi/ns1")),
            Actions::NONE
        );
        assert_eq!(
            policy.allowed(&user("importer-ns1"), &r("vi/ns2/x")),
            Actions::NONE
        );
        assert_eq!(
            policy.allowed(&user("importer-ns1"), &r("cvi/a")),
            set("pull")
        );
        assert_eq!(
            policy.allowed(&Identity::Anonymous, &r("cvi/a")),
            set("pull")
        );
        assert_eq!(
            policy.allowed(&Identity::Anonymous, &r("vi/ns1/x")),
            Actions::NONE
        );
        assert_eq!(policy.allowed(&user("glob"), &r("vi/ns2/a")), set("push"));
        assert_eq!(policy.allowed(&user("exact"), &r("cvi/disk")), set("pull"));
        assert_eq!(
            policy.allowed(&user("exact"), &r("cvi/disk/a")),
            set("pull")
        );
        assert_eq!(
            policy.allowed(&user("exact"), &r("cvi/diskette")),
            set("pull")
        ); // via `* cvi/`
        assert_eq!(
            policy.allowed(&user("nodes"), &Resource::Catalog),
            set("pull")
        );
        assert_eq!(
            policy.allowed(&user("importer-ns1"), &Resource::Catalog),
            Actions::NONE
        );
        assert!(
            !Repositories::parse("cvi/disk")
                .unwrap()
                .matches("cvi/diskette")
        );
    }

    #[test]
    fn without_a_policy_users_may_do_everything_and_anonymous_nothing() {
        let policy = Policy::default();
        let r = Resource::Repository("any/thing".into());
        assert_eq!(
            policy.allowed(&Identity::User("u".into()), &r),
            Actions::ALL
        );
        assert_eq!(policy.allowed(&Identity::Anonymous, &r), Actions::NONE);
    }

    #[test]
    fn malformed_policy_lines_are_refused_naming_the_line() {
        for text in [
            "nodes * pull extra",
            "nodes *",
            "nodes * pul",
            "nodes * ,",
            "nodes Upper/ pull",
            "nodes ../ pull",
            "nodes vi/*/x pull",
        ] {
            let err = Policy::parse_rules(&format!("\n{text}\n"), Path::new("p.txt"))
                .err()
                .unwrap();
            assert!(err.to_string().starts_with("p.txt:2:"), "{err}");
        }
    }

    #[test]
    fn scopes_parse_and_hostile_strings_are_dropped() {
        assert_eq!(
            Scope::parse("repository:vi/ns1/disk:pull,push"),
            Some(Scope {
                resource: Resource::Repository("vi/ns1/disk".into()),
                actions: set("pull,push")
            })
        );
        assert_eq!(
            Scope::parse("repository(plugin):a/b:pull").map(|s| s.actions),
            Some(set("pull"))
        );
        assert_eq!(
            Scope::parse("registry:catalog:*").map(|s| s.resource),
            Some(Resource::Catalog)
        );
        // Unknown actions are ignored, not errors.
        assert_eq!(
            Scope::parse("repository:a:pull,fly").map(|s| s.actions),
            Some(set("pull"))
        );
        for hostile in [
            "",
            ":",
            "::",
            "repository",
            "repository:a",
            "repository::pull",
            "repository:../etc:pull",
            "repository:a/../b:pull",
            "repository:/a:pull",
            "repository:a/:pull",
            "repository:A:pull",
            "repository:a:b:pull",
            "repository:a\"b:pull",
            "repository:a\nb:pull",
            "registry:other:*",
            "unknown:a:pull",
            &format!("repository:{}:pull", "a".repeat(300)),
        ] {
            assert_eq!(Scope::parse(hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn requested_scopes_come_from_every_scope_parameter_and_merge_per_repository() {
        let scopes = requested_scopes(
            "service=dvcr&scope=repository%3Aa%2Fb%3Apull&scope=repository:a/b:push+repository:c:pull&account=x",
        )
        .unwrap();
        assert_eq!(
            scopes,
            vec![
                Scope {
                    resource: Resource::Repository("a/b".into()),
                    actions: set("pull,push")
                },
                Scope {
                    resource: Resource::Repository("c".into()),
                    actions: set("pull")
                },
            ]
        );
        assert_eq!(
            requested_scopes("scope=%zz&scope=%&scope=%C3%28"),
            Some(vec![])
        );
        let many = (0..40)
            .map(|i| format!("scope=repository:r{i}:pull"))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(requested_scopes(&many), None);
        assert_eq!(requested_scopes(&"x".repeat(MAX_QUERY_LEN + 1)), None);
    }

    #[test]
    fn repository_names_follow_the_oci_grammar() {
        for good in ["a", "a/b", "vi/ns-1/disk_image", "a__b", "a---b", "a.b/c0"] {
            assert!(valid_repository_name(good), "{good}");
        }
        for bad in [
            "", "A", "a//b", "a/", "-a", "a-", "a..b", "a___b", "a.-b", "a_.b", "é",
        ] {
            assert!(!valid_repository_name(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_verify_and_expire_and_refuse_tampering() {
        let key = TokenKey(vec![9; 32]);
        let claims = Claims {
            sub: "alice".into(),
            aud: "dvcr".into(),
            iat: 1000,
            exp: 1300,
            access: vec![Grant::from_scope(
                &Scope::parse("repository:a:pull").unwrap(),
            )],
        };
        let token = key.sign(&claims);
        assert_eq!(key.verify(&token, "dvcr", 1299), Ok(claims.clone()));
        assert_eq!(key.verify(&token, "dvcr", 1300), Err("token expired"));
        assert_eq!(
            key.verify(&token, "other", 1100),
            Err("token issued for another service")
        );
        assert_eq!(
            TokenKey(vec![8; 32]).verify(&token, "dvcr", 1100),
            Err("bad token signature")
        );
        // A payload granting more, with the old signature.
        let (_, tag) = token.split_once('.').unwrap();
        let mut forged = claims.clone();
        forged.access[0].actions.push("push".into());
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            key.verify(&format!("{forged_payload}.{tag}"), "dvcr", 1100),
            Err("bad token signature")
        );
        for junk in ["", ".", "abc", "a.b.c", "!!!.???", &"a".repeat(10_000)] {
            assert!(key.verify(junk, "dvcr", 1100).is_err(), "{junk}");
        }
    }

    #[test]
    fn the_token_endpoint_grants_the_intersection_of_asked_and_allowed() {
        let users = format!(
            "{}\n{}",
            bcrypt_entry("importer-ns1", "pw"),
            bcrypt_entry("nodes", "pw")
        );
        let s = secured(
            &users,
            Some("importer-ns1 vi/ns1/ pull,push\nnodes * pull\n* cvi/ pull\n"),
            Some("https://r.example/auth/token"),
        );
        let query = "service=dvcr&scope=repository:vi/ns1/a:pull,push,delete\
                     &scope=repository:vi/ns2/a:pull,push&scope=repository:cvi/x:push,pull";
        let (status, headers, body) = body_json(s.token(&basic("importer-ns1", "pw"), query, 5000));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CACHE_CONTROL], "no-store");
        assert_eq!(body["expires_in"], 300);
        assert_eq!(body["issued_at"], "1970-01-01T01:23:20Z");
        assert_eq!(body["token"], body["access_token"]);
        let claims = s
            .key
            .verify(body["token"].as_str().unwrap(), "dvcr", 5001)
            .unwrap();
        assert_eq!(claims.sub, "importer-ns1");
        assert_eq!(claims.exp, 5300);
        let granted: Vec<(String, Vec<String>)> = claims
            .access
            .iter()
            .map(|g| (g.name.clone(), g.actions.clone()))
            .collect();
        assert_eq!(
            granted,
            vec![
                ("vi/ns1/a".into(), vec!["pull".into(), "push".into()]),
                ("cvi/x".into(), vec!["pull".into()]),
            ]
        );

        // No credentials: anonymous scopes only.
        let (status, _, body) = body_json(s.token(&HeaderMap::new(), query, 5000));
        assert_eq!(status, StatusCode::OK);
        let claims = s
            .key
            .verify(body["token"].as_str().unwrap(), "dvcr", 5001)
            .unwrap();
        assert_eq!(claims.sub, "anonymous");
        assert_eq!(claims.access.len(), 1);
        assert_eq!(claims.access[0].name, "cvi/x");

        // Wrong credentials: 401, not an anonymous token.
        let (status, headers, body) = body_json(s.token(&basic("nodes", "bad"), query, 5000));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[WWW_AUTHENTICATE], "Basic realm=\"dvcr\"");
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    }

    #[test]
    fn a_token_authorizes_what_it_grants_and_asks_for_more_when_the_policy_allows() {
        let s = secured(
            &bcrypt_entry("importer-ns1", "pw"),
            Some("importer-ns1 vi/ns1/ pull,push\n"),
            Some("https://r.example/auth/token"),
        );
        let (_, _, body) = body_json(s.token(
            &basic("importer-ns1", "pw"),
            "scope=repository:vi/ns1/a:pull",
            unix_now(),
        ));
        let token = body["token"].as_str().unwrap().to_owned();
        let headers = bearer(&token);
        let now = unix_now();
        assert_eq!(
            s.authorize(&headers, repo("vi/ns1/a").as_ref(), set("pull"), now)
                .ok(),
            Some("importer-ns1".to_owned())
        );
        assert!(s.authorize(&headers, None, Actions::NONE, now).is_ok());
        // Push is allowed by the policy but not in this token: 401 insufficient_scope.
        let refusal = s
            .authorize(&headers, repo("vi/ns1/a").as_ref(), set("pull,push"), now)
            .err()
            .unwrap();
        let (status, h, _) =
            body_json(s.refusal_response(refusal, repo("vi/ns1/a").as_ref(), set("pull,push")));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            h[WWW_AUTHENTICATE],
            "Bearer realm=\"https://r.example/auth/token\",service=\"dvcr\",\
             scope=\"repository:vi/ns1/a:pull,push\",error=\"insufficient_scope\""
        );
        // Another namespace is outside the policy: 403.
        let refusal = s
            .authorize(&headers, repo("vi/ns2/a").as_ref(), set("pull"), now)
            .err()
            .unwrap();
        let (status, _, body) =
            body_json(s.refusal_response(refusal, repo("vi/ns2/a").as_ref(), set("pull")));
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["errors"][0]["code"], "DENIED");
        // An expired token: 401 invalid_token.
        let refusal = s
            .authorize(&headers, repo("vi/ns1/a").as_ref(), set("pull"), now + 301)
            .err()
            .unwrap();
        assert!(matches!(
            refusal,
            Refusal::Unauthorized {
                error: Some("invalid_token"),
                ..
            }
        ));
    }

    #[test]
    fn basic_credentials_authorize_by_policy_with_401_and_403() {
        let s = secured(
            &format!(
                "{}\n{}",
                bcrypt_entry("pusher", "pw"),
                bcrypt_entry("nodes", "pw")
            ),
            Some("pusher vi/ns1/ pull,push\nnodes * pull\n"),
            None,
        );
        let now = unix_now();
        assert!(
            s.authorize(
                &basic("pusher", "pw"),
                repo("vi/ns1/x").as_ref(),
                set("push"),
                now
            )
            .is_ok()
        );
        assert!(
            s.authorize(
                &basic("pusher", "pw"),
                Some(&Resource::Catalog),
                set("pull"),
                now
            )
            .is_err()
        );
        assert!(
            s.authorize(
                &basic("nodes", "pw"),
                Some(&Resource::Catalog),
                set("pull"),
                now
            )
            .is_ok()
        );
        let refusal = s
            .authorize(
                &basic("pusher", "pw"),
                repo("vi/ns2/x").as_ref(),
                set("push"),
                now,
            )
            .err()
            .unwrap();
        let (status, _, body) =
            body_json(s.refusal_response(refusal, repo("vi/ns2/x").as_ref(), set("push")));
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["errors"][0]["code"], "DENIED");
        assert_eq!(body["errors"][0]["detail"][0]["Name"], "vi/ns2/x");
        for headers in [
            HeaderMap::new(),
            basic("pusher", "wrong"),
            basic("ghost", "pw"),
        ] {
            let refusal = s
                .authorize(&headers, repo("vi/ns1/x").as_ref(), set("pull"), now)
                .err()
                .unwrap();
            let (status, h, body) =
                body_json(s.refusal_response(refusal, repo("vi/ns1/x").as_ref(), set("pull")));
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(h[WWW_AUTHENTICATE], "Basic realm=\"dvcr\"");
            assert_eq!(h[CONTENT_TYPE], "application/json");
            assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
        }
    }

    #[test]
    fn anonymous_pull_allows_pulls_but_not_pushes_nor_the_ping_without_credentials() {
        let mut s = secured(&bcrypt_entry("u", "pw"), None, None);
        s.policy.extra.push(Rule {
            subject: Subject::Anonymous,
            repositories: Repositories::All,
            actions: set("pull"),
        });
        let none = HeaderMap::new();
        let now = unix_now();
        assert_eq!(
            s.authorize(&none, repo("a/b").as_ref(), set("pull"), now)
                .ok(),
            Some("anonymous".to_owned())
        );
        assert!(
            s.authorize(&none, repo("a/b").as_ref(), set("pull,push"), now)
                .is_err()
        );
        assert!(s.authorize(&none, None, Actions::NONE, now).is_err());
        assert!(
            s.authorize(
                &basic("u", "pw"),
                repo("a/b").as_ref(),
                set("push,delete"),
                now
            )
            .is_ok()
        );
    }

    #[test]
    fn hostile_authorization_headers_are_refused_without_panicking() {
        let s = secured(&bcrypt_entry("u", "pw"), None, Some("https://r/auth/token"));
        let now = unix_now();
        for value in [
            "Basic",
            "Basic !!!",
            "Basic dXNlcg==", // "user" without a colon
            "Basic //79",     // not UTF-8
            "Bearer",
            "Bearer a.b",
            "Digest x",
            "",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(
                axum::http::header::AUTHORIZATION,
                HeaderValue::from_str(value).unwrap(),
            );
            assert!(
                s.authorize(&headers, repo("a").as_ref(), set("pull"), now)
                    .is_err(),
                "{value}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_bytes(&[b'B', b'a', b's', b'i', b'c', b' ', 0xff]).unwrap(),
        );
        assert!(
            s.authorize(&headers, repo("a").as_ref(), set("pull"), now)
                .is_err()
        );
    }

    #[test]
    fn challenges_quote_their_values() {
        assert_eq!(quoted("a\"b\\c\nd"), "\"a\\\"b\\\\cd\"");
    }

    #[test]
    fn issued_at_is_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn an_open_auth_allows_everything_and_has_no_token_endpoint() {
        let auth = Auth::open();
        let access = Access {
            repository: Some("a".into()),
            actions: vec![Action::Push, Action::Delete],
        };
        assert!(auth.authorize(&HeaderMap::new(), &access).is_ok());
        assert!(!auth.has_token_endpoint());
        assert_eq!(
            auth.token(&HeaderMap::new(), "").status(),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn auth_settings_without_users_are_refused() {
        let config = AuthConfig {
            anonymous_pull: true,
            ..AuthConfig::default()
        };
        assert!(Auth::new(&config).is_err());
        assert!(
            !Auth::new(&AuthConfig::default())
                .unwrap()
                .has_token_endpoint()
        );
    }

    #[test]
    fn a_short_token_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, bcrypt_entry("u", "pw")).unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, b"short").unwrap();
        let config = AuthConfig {
            htpasswd: Some(htpasswd),
            token_key: Some(key.clone()),
            token_realm: Some("https://r/auth/token".into()),
            ..AuthConfig::default()
        };
        let message = Auth::new(&config).err().unwrap().to_string();
        assert!(message.contains(&key.display().to_string()), "{message}");
        std::fs::write(&key, [3u8; 32]).unwrap();
        assert!(Auth::new(&config).unwrap().has_token_endpoint());
    }
}
