//! Image references as users write them (`docker://host:5000/a/b:tag`, `host/a/b@sha256:…`,
//! `ubuntu`), parsed into registry, repository, tag and digest with the distribution
//! grammar checked, and Docker Hub's short names normalised (`ubuntu` →
//! `registry-1.docker.io/library/ubuntu:latest`).

use std::fmt;

use super::error::OciError;

/// The host Docker Hub's API answers on; `docker.io` and `index.docker.io` mean it too.
pub const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// How a registry is named when none is given.
const DOCKER_HUB_NAME: &str = "docker.io";
/// The longest repository name accepted (the distribution reference's limit).
pub const MAX_REPOSITORY_LEN: usize = 255;
/// The longest reference string looked at.
const MAX_INPUT_LEN: usize = 4096;

/// An image in a registry: where it is and which version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host` or `host:port` as written (`registry-1.docker.io` for Docker Hub).
    pub registry: String,
    /// The repository name (`library/ubuntu`, `vi/ns/name`).
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>` or `sha512:<hex>`; when set it wins over the tag for pulls.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `docker://host/repo:tag`, `host/repo@sha256:…` or a Docker Hub short name.
    pub fn parse(input: &str) -> Result<Self, OciError> {
        let bad = |why: &str| {
            OciError::invalid(format!(
                "{} is not an image reference: {why}; write it as docker://host[:port]/repository[:tag][@sha256:digest]",
                shown(input)
            ))
        };
        if input.len() > MAX_INPUT_LEN {
            return Err(bad("it is too long"));
        }
        let text = input.trim();
        let text = match text.get(..9) {
            Some(p) if p.eq_ignore_ascii_case("docker://") => &text[9..],
            _ => text,
        };
        if text.contains("://") {
            return Err(bad("only the docker:// scheme is supported"));
        }
        if text.is_empty() {
            return Err(bad("it is empty"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(parse_digest(digest).map_err(|e| bad(&e))?)),
            None => (text, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, remainder)) if looks_like_host(first) => (first, remainder),
            _ => (DOCKER_HUB_NAME, rest),
        };
        let (name, tag) = match path.rfind(':') {
            Some(i) if !path[i..].contains('/') => (&path[..i], Some(&path[i + 1..])),
            _ => (path, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|e| bad(&e))?;
        }
        check_host(registry).map_err(|e| bad(&e))?;
        let mut registry = registry.to_owned();
        let mut repository = name.to_owned();
        if is_docker_hub(&registry) {
            registry = DOCKER_HUB_REGISTRY.to_owned();
            if !repository.contains('/') {
                repository = format!("library/{repository}");
            }
        }
        check_repository(&repository).map_err(|e| bad(&e))?;
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What goes after `/manifests/` to pull: the digest when there is one, else the tag.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same registry and repository, another version (`sha256:…` digest or tag).
    pub fn at(&self, reference: &str) -> Reference {
        let mut r = Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: None,
        };
        if reference.contains(':') {
            r.digest = Some(reference.to_owned());
        } else {
            r.tag = Some(reference.to_owned());
        }
        r
    }

    /// The same registry, another repository, the same tag and digest.
    pub fn in_repository(&self, repository: &str) -> Result<Reference, OciError> {
        check_repository(repository).map_err(|e| {
            OciError::invalid(format!(
                "{} is not a repository name: {e}",
                shown(repository)
            ))
        })?;
        Ok(Reference {
            repository: repository.to_owned(),
            ..self.clone()
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = if self.registry == DOCKER_HUB_REGISTRY {
            DOCKER_HUB_NAME
        } else {
            &self.registry
        };
        write!(f, "docker://{registry}/{}", self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Whether `host` is one of Docker Hub's names.
pub fn is_docker_hub(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    host == DOCKER_HUB_NAME || host == "index.docker.io" || host == DOCKER_HUB_REGISTRY
}

/// The first path component names a registry when it has a dot or a port, is
/// `localhost`, an IPv6 literal, or has capitals (which repository names cannot).
fn looks_like_host(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.starts_with('[')
        || first.chars().any(|c| c.is_ascii_uppercase())
}

/// At most 80 characters of untrusted text, quoted, for messages.
pub(crate) fn shown(text: &str) -> String {
    let cut: String = text.chars().take(80).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Checks `algorithm:hex` and returns it; only digests this client can verify pass.
pub fn parse_digest(digest: &str) -> Result<String, String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!(
            "the digest {} has no algorithm (sha256:<64 hex digits>)",
            shown(digest)
        ));
    };
    let len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => {
            return Err(format!(
                "the digest algorithm {} is not supported (sha256 and sha512 are)",
                shown(algorithm)
            ));
        }
    };
    if hex.len() != len
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "the digest {} must be {algorithm}: and {len} lowercase hex digits",
            shown(digest)
        ));
    }
    Ok(digest.to_owned())
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the tag {} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
            shown(tag)
        ))
    }
}

/// `host` or `host:port`, where host is DNS labels or a bracketed IPv6 literal.
fn check_host(registry: &str) -> Result<(), String> {
    let fail = || {
        Err(format!(
            "the registry {} is not host[:port]",
            shown(registry)
        ))
    };
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return fail();
        };
        if inside.is_empty() || !inside.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return fail();
        }
        match after {
            "" => (inside, None),
            p => match p.strip_prefix(':') {
                Some(port) => (inside, Some(port)),
                None => return fail(),
            },
        }
    } else {
        let (host, port) = match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        };
        if !dns_name_ok(host) {
            return fail();
        }
        (host, port)
    };
    if host.len() > 253 {
        return fail();
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return fail();
        }
    }
    Ok(())
}

/// Dot-separated labels of letters, digits and inner dashes.
fn dns_name_ok(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Components `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`, at most 255 characters.
pub fn check_repository(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the repository name is empty".into());
    }
    if name.len() > MAX_REPOSITORY_LEN {
        return Err(format!(
            "the repository name is {} characters long (at most {MAX_REPOSITORY_LEN})",
            name.len()
        ));
    }
    for component in name.split('/') {
        if !component_ok(component) {
            let hint = if component.chars().any(|c| c.is_ascii_uppercase()) {
                " (repository names are lowercase)"
            } else {
                ""
            };
            return Err(format!(
                "the repository component {} must be lowercase letters and digits separated by '.', '_', '__' or dashes{hint}",
                shown(component)
            ));
        }
    }
    Ok(())
}

fn component_ok(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or any number of '-'.
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Reference {
        match Reference::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn a_full_reference_with_port_and_tag_splits_into_its_parts() {
        let r = parsed("docker://host:5000/a/b:v1.2");
        assert_eq!(r.registry, "host:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.digest, None);
        assert_eq!(r.reference(), "v1.2");
        assert_eq!(r.to_string(), "docker://host:5000/a/b:v1.2");
    }

    #[test]
    fn a_digest_reference_pulls_by_digest_and_no_tag_means_latest() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = parsed(&format!("host.example/a/b@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), d);
        let r = parsed("localhost/a");
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = parsed("ubuntu");
        assert_eq!(r.registry, DOCKER_HUB_REGISTRY);
        assert_eq!(r.repository, "library/ubuntu");
        let r = parsed("docker.io/user/img:1");
        assert_eq!(r.registry, DOCKER_HUB_REGISTRY);
        assert_eq!(r.repository, "user/img");
        assert_eq!(r.to_string(), "docker://docker.io/user/img:1");
        assert_eq!(
            parsed("index.docker.io/busybox").repository,
            "library/busybox"
        );
    }

    #[test]
    fn bad_names_tags_digests_and_schemes_are_refused_with_advice() {
        for bad in [
            "",
            "http://host/a:b",
            "host/A/b",
            "host/a//b",
            "host/a:-tag",
            "host/a@sha256:xyz",
            "host/a@md5:0123",
            "host:99999/a",
            "ho_st:5000/a",
            "host/a..b",
        ] {
            let e = Reference::parse(bad).err().map(|e| e.to_string());
            let e = e.unwrap_or_else(|| panic!("{bad:?} must be refused"));
            assert!(e.contains("docker://host"), "{e}");
        }
        assert!(Reference::parse("host/a__b-c--d.e").is_ok());
        assert!(Reference::parse("[::1]:5000/a").is_ok());
    }
}
