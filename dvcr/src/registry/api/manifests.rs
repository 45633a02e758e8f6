//! Manifests: push (validated, stored byte-exact with their media type), pull by tag or
//! digest, delete.
//!
//! Accepted: OCI image manifest and index, Docker schema2 manifest and manifest list.
//! Docker schema1 is refused: it is deprecated, signed over a rewritten form, and no current
//! client needs it.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256, Sha512};

use super::{ApiResult, BodyError, CONTENT_DIGEST, OCI_SUBJECT, Shared, read_limited, respond};
use crate::registry::error::{ApiError, Code};
use crate::registry::names::{Algorithm, Digest, NameError, Reference};
use crate::registry::storage::{Manifest, StorageError};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::new(Code::ManifestInvalid, detail)
}

fn parse_reference(reference: &str, for_write: bool) -> Result<Reference, ApiError> {
    Reference::parse(reference).map_err(|e| match e {
        NameError::Tag(_) if for_write => invalid(e.to_string()),
        NameError::Tag(_) => ApiError::new(Code::ManifestUnknown, e.to_string()),
        _ => ApiError::new(Code::DigestInvalid, e.to_string()),
    })
}

/// A validated descriptor: its digest and whether it may be absent (foreign layers with
/// `urls` are fetched from elsewhere).
fn descriptor(value: &Value, what: &str) -> Result<(Digest, bool), ApiError> {
    let obj = value
        .as_object()
        .ok_or_else(|| invalid(format!("{what} is not a descriptor object")))?;
    let digest = obj
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what} has no digest")))?;
    let digest = Digest::parse(digest).map_err(|e| invalid(format!("{what}: {e}")))?;
    if obj.get("size").is_some_and(|s| s.as_u64().is_none()) {
        return Err(invalid(format!("{what} has an invalid size")));
    }
    let foreign = obj
        .get("urls")
        .and_then(Value::as_array)
        .is_some_and(|u| !u.is_empty());
    Ok((digest, foreign))
}

/// What a manifest refers to, and what the referrers API shows of it.
#[derive(Debug)]
struct Parsed {
    media_type: String,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
    subject: Option<Digest>,
    artifact_type: Option<String>,
    annotations: Option<Value>,
}

/// Parses and validates a manifest; `content_type` is the request's (without parameters).
fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let obj: &Map<String, Value> = value
        .as_object()
        .ok_or_else(|| invalid("not a JSON object"))?;
    let schema_version = obj.get("schemaVersion").and_then(Value::as_u64);
    let field_type = obj.get("mediaType").and_then(Value::as_str);
    if schema_version == Some(1)
        || content_type.is_some_and(|c| SCHEMA1.contains(&c))
        || field_type.is_some_and(|c| SCHEMA1.contains(&c))
    {
        return Err(invalid(
            "Docker schema1 manifests are not supported: push schema2 or OCI",
        ));
    }
    if schema_version != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    let known = |t: &str| [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&t);
    let header_type = content_type.filter(|t| known(t));
    let media_type = match (header_type, field_type) {
        (Some(h), Some(f)) if h != f => {
            return Err(invalid(format!(
                "Content-Type {h} does not match the manifest's mediaType {f}"
            )));
        }
        (_, Some(f)) => f.to_owned(),
        (Some(h), None) => h.to_owned(),
        (None, None) if obj.contains_key("manifests") => OCI_INDEX.to_owned(),
        (None, None) if obj.contains_key("config") => OCI_MANIFEST.to_owned(),
        (None, None) => return Err(invalid("cannot tell the manifest type: set Content-Type")),
    };
    if !known(&media_type) {
        return Err(invalid(format!(
            "unsupported manifest media type {media_type}"
        )));
    }
    let mut parsed = Parsed {
        media_type,
        blobs: Vec::new(),
        children: Vec::new(),
        subject: None,
        artifact_type: obj
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_owned),
        annotations: obj.get("annotations").filter(|a| a.is_object()).cloned(),
    };
    if parsed.media_type == OCI_INDEX || parsed.media_type == DOCKER_LIST {
        let manifests = obj
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("an index needs a manifests array"))?;
        for (i, m) in manifests.iter().enumerate() {
            let (d, _) = descriptor(m, &format!("manifests[{i}]"))?;
            parsed.children.push(d);
        }
    } else {
        let config = obj
            .get("config")
            .ok_or_else(|| invalid("a manifest needs a config"))?;
        let (d, _) = descriptor(config, "config")?;
        parsed.blobs.push(d);
        if parsed.artifact_type.is_none() {
            parsed.artifact_type = config
                .get("mediaType")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        let layers = obj
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("a manifest needs a layers array"))?;
        for (i, l) in layers.iter().enumerate() {
            let (d, foreign) = descriptor(l, &format!("layers[{i}]"))?;
            if !foreign {
                parsed.blobs.push(d);
            }
        }
    }
    if let Some(subject) = obj.get("subject") {
        parsed.subject = Some(descriptor(subject, "subject")?.0);
    }
    Ok(parsed)
}

fn digest_of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
    match algorithm {
        Algorithm::Sha256 => Digest::from_bytes(algorithm, &Sha256::digest(bytes)),
        Algorithm::Sha512 => Digest::from_bytes(algorithm, &Sha512::digest(bytes)),
    }
}

/// `PUT /v2/<name>/manifests/<reference>`.
pub async fn put(state: &Shared, name: &str, reference: &str, req: Request) -> ApiResult {
    let reference = parse_reference(reference, true)?;
    let max = state.limits.max_manifest_bytes;
    let too_large = || {
        ApiError::new(
            Code::SizeInvalid,
            format!("manifests are limited to {max} bytes"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let declared: Option<u64> = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if declared.is_some_and(|l| l > max as u64) {
        return Err(too_large());
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
    let mut body = req.into_body();
    let bytes = read_limited(&mut body, max, state.limits.idle_timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => too_large(),
            BodyError::Idle => invalid("the manifest body stalled"),
            BodyError::Broken(e) => invalid(format!("the manifest body broke off: {e}")),
        })?;
    let parsed = parse(&bytes, content_type.as_deref())?;

    let digest = match &reference {
        Reference::Digest(d) => {
            let actual = digest_of(d.algorithm(), &bytes);
            if &actual != d {
                return Err(ApiError::new(
                    Code::DigestInvalid,
                    format!("the manifest bytes have digest {actual}, not {d}"),
                ));
            }
            actual
        }
        Reference::Tag(_) => digest_of(Algorithm::Sha256, &bytes),
    };

    for blob in &parsed.blobs {
        match state.storage.blob_size(name, blob).await {
            Ok(_) => {}
            Err(StorageError::BlobUnknown(_)) => {
                return Err(ApiError::new(
                    Code::ManifestBlobUnknown,
                    format!("blob {blob} is not in repository {name}: push it first"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    for child in &parsed.children {
        if !state.storage.has_manifest(name, child).await? {
            return Err(ApiError::new(
                Code::ManifestBlobUnknown,
                format!("manifest {child} is not in repository {name}: push it first"),
            ));
        }
    }

    let subject = parsed.subject.as_ref().map(|s| {
        let mut d = json!({
            "mediaType": parsed.media_type,
            "digest": digest.to_string(),
            "size": bytes.len(),
        });
        if let Some(t) = &parsed.artifact_type {
            d["artifactType"] = json!(t);
        }
        if let Some(a) = &parsed.annotations {
            d["annotations"] = a.clone();
        }
        (s, d)
    });
    let manifest = Manifest {
        digest: digest.clone(),
        media_type: parsed.media_type.clone(),
        bytes: Bytes::from(bytes),
    };
    let tag = match &reference {
        Reference::Tag(t) => Some(t.as_str()),
        Reference::Digest(_) => None,
    };
    state
        .storage
        .put_manifest(name, &manifest, tag, subject)
        .await?;
    tracing::info!(repository = name, %digest, reference = %reference, "manifest pushed");

    let mut headers = vec![
        (header::LOCATION, format!("/v2/{name}/manifests/{digest}")),
        (CONTENT_DIGEST, digest.to_string()),
        (header::CONTENT_LENGTH, "0".to_owned()),
    ];
    if let Some(s) = &parsed.subject {
        headers.push((OCI_SUBJECT, s.to_string()));
    }
    Ok(respond(StatusCode::CREATED, &headers, Body::empty()))
}

/// `GET`/`HEAD /v2/<name>/manifests/<reference>`.
pub async fn get(state: &Shared, name: &str, reference: &str, head: bool) -> ApiResult {
    let reference = parse_reference(reference, false)?;
    let m = state.storage.get_manifest(name, &reference).await?;
    let headers = [
        (header::CONTENT_TYPE, m.media_type.clone()),
        (CONTENT_DIGEST, m.digest.to_string()),
        (header::CONTENT_LENGTH, m.bytes.len().to_string()),
        (header::ETAG, format!("\"{}\"", m.digest)),
    ];
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.bytes)
    };
    Ok(respond(StatusCode::OK, &headers, body))
}

/// `DELETE /v2/<name>/manifests/<reference>`: by digest removes the manifest (and its tags),
/// by tag removes only the tag; 202.
pub async fn delete(state: &Shared, name: &str, reference: &str) -> ApiResult {
    match parse_reference(reference, false)? {
        Reference::Digest(d) => state.storage.delete_manifest(name, &d).await?,
        Reference::Tag(t) => state.storage.delete_tag(name, &t).await?,
    }
    Ok(respond(
        StatusCode::ACCEPTED,
        &[(header::CONTENT_LENGTH, "0".to_owned())],
        Body::empty(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn schema1_manifests_are_refused() {
        let m = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert!(parse(m, None).is_err());
    }

    #[test]
    fn an_oci_manifest_lists_its_config_and_layers_and_subject() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/x","digest":"{D}","size":2}},
            "layers":[{{"mediaType":"l","digest":"{D}","size":1}},{{"mediaType":"f","digest":"{D}","size":1,"urls":["http://x"]}}],
            "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":3}}}}"#
        );
        let p = parse(m.as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(p.blobs.len(), 2);
        assert_eq!(p.artifact_type.as_deref(), Some("application/x"));
        assert!(p.subject.is_some());
    }

    #[test]
    fn a_content_type_contradicting_the_media_type_field_is_refused() {
        let m = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(parse(m.as_bytes(), Some(DOCKER_MANIFEST)).is_err());
        assert_eq!(
            parse(m.as_bytes(), Some("application/json"))
                .unwrap()
                .media_type,
            OCI_INDEX
        );
    }
}
