//! A streaming extractor for the first file part of a `multipart/form-data` body
//! (`curl -F file=@disk.img URL`), so browsers and form-based clients can upload too.
//!
//! Only the bytes of the first part whose `Content-Disposition` names a `filename` are
//! passed on; other parts and everything after the file part are skipped. The body is
//! never held in memory: at most one delimiter's worth of bytes is kept back between
//! chunks (it may be the start of the closing delimiter).

/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;
/// Longest part header block accepted.
const MAX_HEADERS: usize = 16 << 10;

/// Why a multipart body cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The Content-Type has no usable boundary.
    #[error(
        "the multipart Content-Type has no usable boundary parameter; send the file with `curl -F file=@disk.img` or as a raw body with `curl -T disk.img`"
    )]
    NoBoundary,
    /// A part's header block is too long or the framing is broken.
    #[error("the multipart body is malformed: {0}")]
    Malformed(&'static str),
    /// The body ended before a file part closed.
    #[error(
        "the multipart body ended before its file part was complete (or it has no part with a filename); send the image with `curl -F file=@disk.img`"
    )]
    Incomplete,
}

/// The boundary of a `multipart/form-data` Content-Type, or `None` for other types.
pub fn boundary(content_type: &str) -> Option<Result<String, MultipartError>> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    for p in params {
        if let Some((k, v)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("boundary")
        {
            let v = v.trim().trim_matches('"');
            if v.is_empty() || v.len() > MAX_BOUNDARY {
                return Some(Err(MultipartError::NoBoundary));
            }
            return Some(Ok(v.to_owned()));
        }
    }
    Some(Err(MultipartError::NoBoundary))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Looking for the next `--boundary` line.
    Delimiter,
    /// Reading a part's headers up to the blank line.
    Headers,
    /// Passing on the file part's bytes.
    File,
    /// Skipping a part that is not a file.
    Skip,
    /// The file part is complete; the rest is ignored.
    Done,
}

/// Feeds body chunks in, gets the file part's bytes out.
#[derive(Debug)]
pub struct FilePart {
    /// `\r\n--boundary`; the very first delimiter lacks the CRLF, handled by priming the
    /// buffer with one.
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    state: State,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        match haystack[i..=haystack.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            None => return None,
            Some(p) => {
                let at = i + p;
                if haystack[at..at + needle.len()] == *needle {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

impl FilePart {
    /// An extractor for bodies delimited by `boundary`.
    pub fn new(boundary: &str) -> Self {
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            // The first delimiter may start the body with no CRLF before it.
            buf: b"\r\n".to_vec(),
            state: State::Delimiter,
        }
    }

    /// True once the file part's closing delimiter was seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes `chunk`, appending file bytes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MultipartError> {
        if self.state == State::Done {
            return Ok(());
        }
        self.buf.extend_from_slice(chunk);
        loop {
            match self.state {
                State::Done => {
                    self.buf.clear();
                    return Ok(());
                }
                State::Delimiter | State::Skip => match find(&self.buf, &self.delimiter) {
                    Some(at) => {
                        self.buf.drain(..at + self.delimiter.len());
                        self.state = State::Headers;
                    }
                    None => {
                        let keep = self.delimiter.len() - 1;
                        if self.buf.len() > keep {
                            self.buf.drain(..self.buf.len() - keep);
                        }
                        return Ok(());
                    }
                },
                State::Headers => {
                    // After the delimiter: `--` (the closing one) or CRLF then headers.
                    if self.buf.len() < 2 {
                        return Ok(());
                    }
                    if self.buf.starts_with(b"--") {
                        return Err(MultipartError::Incomplete);
                    }
                    let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                        if self.buf.len() > MAX_HEADERS {
                            return Err(MultipartError::Malformed(
                                "a part's headers are longer than 16 KiB",
                            ));
                        }
                        return Ok(());
                    };
                    let headers = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                    let is_file = headers.lines().any(|line| {
                        line.starts_with("content-disposition:") && line.contains("filename")
                    });
                    self.buf.drain(..end + 4);
                    self.state = if is_file { State::File } else { State::Skip };
                }
                State::File => match find(&self.buf, &self.delimiter) {
                    Some(at) => {
                        out.extend_from_slice(&self.buf[..at]);
                        self.buf.clear();
                        self.state = State::Done;
                    }
                    None => {
                        let keep = self.delimiter.len() - 1;
                        if self.buf.len() > keep {
                            let emit = self.buf.len() - keep;
                            out.extend_from_slice(&self.buf[..emit]);
                            self.buf.drain(..emit);
                        }
                        return Ok(());
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn body() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n",
        );
        b.extend_from_slice(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.img\"\r\n",
        );
        b.extend_from_slice(b"Content-Type: application/octet-stream\r\n\r\n");
        b.extend_from_slice(b"\r\n--XyQ is not the end\r\n-- and neither is this");
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    }

    #[test]
    fn the_file_part_is_extracted_whatever_the_chunking() {
        let body = body();
        for size in [1, 2, 3, 7, 64, body.len()] {
            let mut part = FilePart::new("XyZ");
            let mut out = Vec::new();
            for chunk in body.chunks(size) {
                part.push(chunk, &mut out).unwrap();
            }
            assert!(part.is_done(), "chunk size {size}");
            assert_eq!(
                out, b"\r\n--XyQ is not the end\r\n-- and neither is this",
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn the_boundary_is_read_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"abc\"").unwrap(),
            Ok("abc".into())
        );
        assert!(boundary("application/octet-stream").is_none());
        assert_eq!(
            boundary("multipart/form-data").unwrap(),
            Err(MultipartError::NoBoundary)
        );
    }
}
