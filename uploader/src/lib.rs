//! `dvcr-uploader`: the `curl -T` upload endpoints (signed, expiring, resumable URLs) that feed
//! the importer pipeline.
//!
//! Nothing is implemented here yet: the crate exists so the workspace has the shape of
//! `ARCHITECTURE.md` from the start. The uploader is tracked as its own issue.
