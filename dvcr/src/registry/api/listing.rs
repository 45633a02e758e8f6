//! Listings: tags (sorted, `n`/`last` pagination with a `Link` header), the catalog (same
//! pagination) and referrers (an OCI index, filterable by `artifactType`).

use axum::body::Body;
use axum::http::{StatusCode, header};
use serde_json::json;

use super::{ApiResult, OCI_FILTERS_APPLIED, Shared, query_value, respond};
use crate::registry::error::{ApiError, Code};
use crate::registry::names::{Digest, percent_encode};

/// One page of a sorted list: the entries after `last` (exclusive), at most `n`, and, when
/// more follow, the `n` and `last` of the next page.
#[derive(Debug)]
struct Page {
    items: Vec<String>,
    next: Option<(usize, String)>,
}

fn page(all: Vec<String>, query: &[(String, String)]) -> Result<Page, ApiError> {
    let n = match query_value(query, "n") {
        None | Some("") => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::new(
                Code::PaginationNumberInvalid,
                format!("n={v} is not a non-negative number"),
            )
        })?),
    };
    let last = query_value(query, "last").filter(|l| !l.is_empty());
    let mut items: Vec<String> = match last {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last).collect(),
        None => all,
    };
    let mut next = None;
    if let Some(n) = n
        && items.len() > n
    {
        items.truncate(n);
        if let Some(l) = items.last() {
            next = Some((n, l.clone()));
        }
    }
    Ok(Page { items, next })
}

fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    content_type: &str,
    link: Option<String>,
) -> axum::response::Response {
    let bytes = body.to_string();
    let mut headers = vec![
        (header::CONTENT_TYPE, content_type.to_owned()),
        (header::CONTENT_LENGTH, bytes.len().to_string()),
    ];
    if let Some(link) = link {
        headers.push((header::LINK, link));
    }
    respond(status, &headers, Body::from(bytes))
}

/// `GET /v2/<name>/tags/list`.
pub async fn tags(state: &Shared, name: &str, query: &[(String, String)]) -> ApiResult {
    let all = state.storage.tags(name).await?;
    let Page { items: tags, next } = page(all, query)?;
    let link = next.map(|(n, last)| {
        format!(
            "</v2/{name}/tags/list?n={n}&last={}>; rel=\"next\"",
            percent_encode(&last)
        )
    });
    Ok(json_response(
        StatusCode::OK,
        &json!({ "name": name, "tags": tags }),
        "application/json",
        link,
    ))
}

/// `GET /v2/_catalog`.
pub async fn catalog(state: &Shared, query: &[(String, String)]) -> ApiResult {
    let all = state.storage.catalog().await?;
    let Page { items: repos, next } = page(all, query)?;
    let link = next.map(|(n, last)| {
        format!(
            "</v2/_catalog?n={n}&last={}>; rel=\"next\"",
            percent_encode(&last)
        )
    });
    Ok(json_response(
        StatusCode::OK,
        &json!({ "repositories": repos }),
        "application/json",
        link,
    ))
}

/// `GET /v2/<name>/referrers/<digest>`: always 200 with an OCI index.
pub async fn referrers(
    state: &Shared,
    name: &str,
    digest: &str,
    query: &[(String, String)],
) -> ApiResult {
    let subject =
        Digest::parse(digest).map_err(|e| ApiError::new(Code::DigestInvalid, e.to_string()))?;
    let mut manifests = state.storage.referrers(name, &subject).await?;
    let filter = query_value(query, "artifactType").filter(|t| !t.is_empty());
    let mut response_headers = None;
    if let Some(filter) = filter {
        manifests.retain(|d| d["artifactType"].as_str() == Some(filter));
        response_headers = Some(());
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": super::manifests::OCI_INDEX,
        "manifests": manifests,
    });
    let mut resp = json_response(StatusCode::OK, &index, super::manifests::OCI_INDEX, None);
    if response_headers.is_some() {
        resp.headers_mut().insert(
            OCI_FILTERS_APPLIED,
            header::HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn list() -> Vec<String> {
        ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pages_start_after_last_and_announce_the_next_page() {
        let Page { items, next } = page(list(), &q(&[("n", "2")])).unwrap();
        assert_eq!(items, ["a", "b"]);
        assert_eq!(next, Some((2, "b".to_string())));
        let Page { items, next } = page(list(), &q(&[("n", "2"), ("last", "b")])).unwrap();
        assert_eq!(items, ["c", "d"]);
        assert_eq!(next, None);
        let Page { items, .. } = page(list(), &q(&[("last", "c")])).unwrap();
        assert_eq!(items, ["d"]);
        let Page { items, next } = page(list(), &q(&[("n", "0")])).unwrap();
        assert!(items.is_empty());
        assert_eq!(next, None);
        assert!(page(list(), &q(&[("n", "-1")])).is_err());
    }
}
