//! `dvcr-importer`: turns a source (a file, standard input, an HTTP URL; later registries,
//! DVCR images and block devices) into a DVCR artifact or a filled disk.
//!
//! What is here now is the source side shared by `dvcr inspect` and the importer: opening a
//! location the user names as a blocking byte stream. The pipeline, the sinks and the job
//! contract (`IMPORTER_*` variables, termination message, gauges) build on it.

pub mod source;

pub use source::{Location, SourceError};
