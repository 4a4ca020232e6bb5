//! Reading request bodies without letting a client hold the server: a whole body (an image for
//! `/segment`) is read under a size limit, a deadline, and a budget of body bytes held across
//! all requests at once; a multipart body goes through a guard that caps its parts and their
//! header sections before the parser buffers them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use futures_util::Stream;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// A body of raw bytes (an image, an archive), documented as a binary string.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[schema(value_type = String, format = Binary, min_length = 1)]
#[allow(dead_code)]
pub struct BinaryBody(Vec<u8>);

/// Request-body bytes held in memory at once, across all requests.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
}

/// Bytes of the budget held by one request, given back when dropped.
pub struct Held(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self { bytes: Arc::new(Semaphore::new(bytes.clamp(1, Semaphore::MAX_PERMITS))) }
    }

    /// Takes `n` more bytes for a request, or refuses at once.
    fn take(&self, held: &mut Held, n: usize) -> Result<(), ApiError> {
        let n = u32::try_from(n).map_err(|_| ApiError::Busy(1))?;
        let more = self.bytes.clone().try_acquire_many_owned(n).map_err(|_| ApiError::Busy(1))?;
        match &mut held.0 {
            Some(p) => p.merge(more),
            None => held.0 = Some(more),
        }
        Ok(())
    }

    /// Bytes held now.
    pub fn held(&self, total: usize) -> usize {
        total.saturating_sub(self.bytes.available_permits())
    }
}

/// Reads a whole body: at most `limit` bytes (413 past it, at once when the declared length is
/// over), all of it within `deadline` (408 otherwise), its bytes counted against `budget` (429
/// when the server holds too many already).
pub async fn read_whole(
    body: Body,
    declared: Option<u64>,
    limit: usize,
    budget: &BodyBudget,
    deadline: Duration,
) -> Result<(Bytes, Held), ApiError> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut held = Held(None);
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    let mut body = body;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            let Ok(chunk) = frame.into_data() else { continue };
            if out.len() + chunk.len() > limit {
                return Err(too_large(limit));
            }
            budget.take(&mut held, chunk.len())?;
            out.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(())) => Ok((Bytes::from(out), held)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            Err(ApiError::Status(StatusCode::REQUEST_TIMEOUT, format!("the request body did not arrive within {} s", deadline.as_secs())))
        }
    }
}

pub fn too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!("the body exceeds the limit of {limit} bytes"))
}

/// The multipart parser over a body stream behind the guard.
pub fn multipart<S, E>(stream: S, boundary: &str, max_parts: usize, max_header_bytes: usize, limit: usize) -> multer::Multipart<'static>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let guarded = Guarded::new(stream, boundary, max_parts, max_header_bytes);
    let constraints = multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit as u64));
    multer::Multipart::with_constraints(guarded, boundary.to_string(), constraints)
}

/// A multipart error as an answer: 413 past a size limit, 400 otherwise (the guard's caps
/// included, by their own words).
pub fn multipart_error(e: multer::Error, limit: usize) -> ApiError {
    match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => too_large(limit),
        multer::Error::StreamReadFailed(inner) => match inner.downcast_ref::<MultipartLimit>() {
            Some(l) => ApiError::BadRequest(l.to_string()),
            None if inner.is::<tower_http::timeout::TimeoutError>()
                || inner.source().is_some_and(|s| s.is::<tower_http::timeout::TimeoutError>()) =>
            {
                ApiError::Status(StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving".into())
            }
            None if inner.to_string().contains("length limit exceeded") => too_large(limit),
            None => ApiError::BadRequest(format!("reading the body: {inner}")),
        },
        other => ApiError::BadRequest(format!("malformed multipart body: {other}")),
    }
}

/// Why a multipart body was refused by the guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartLimit {
    #[error("the multipart body has more than {0} parts")]
    TooManyParts(usize),
    #[error("a multipart part's headers are longer than {0} bytes")]
    HeadersTooLong(usize),
}

/// The caps, and where in the stream the guard is.
#[derive(Debug)]
struct Scanner {
    /// `\r\n--boundary`: what precedes every part (the first may come without the CRLF).
    delimiter: Vec<u8>,
    max_parts: usize,
    max_header_bytes: usize,
    delimiters_seen: usize,
    /// Bytes of the current part's header section, while reading one.
    in_headers: Option<usize>,
    /// The last bytes of the stream so far, enough to find a delimiter or a header end that
    /// straddles two chunks.
    tail: Vec<u8>,
}

const HEADER_END: &[u8] = b"\r\n\r\n";

impl Scanner {
    fn new(boundary: &str, max_parts: usize, max_header_bytes: usize) -> Self {
        // A leading CRLF stands in for the start of the body, so the first delimiter matches too.
        Self {
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            max_parts,
            max_header_bytes,
            delimiters_seen: 0,
            in_headers: None,
            tail: b"\r\n".to_vec(),
        }
    }

    /// Scans the next chunk of the raw body.
    fn feed(&mut self, chunk: &[u8]) -> Result<(), MultipartLimit> {
        let mut data = std::mem::take(&mut self.tail);
        data.extend_from_slice(chunk);
        // Where scanning goes on from: everything before it is matched or counted.
        let mut pos = 0usize;
        loop {
            match self.in_headers {
                None => {
                    let Some(at) = memchr::memmem::find(&data[pos..], &self.delimiter) else { break };
                    pos += at + self.delimiter.len();
                    self.delimiters_seen += 1;
                    // The closing delimiter counts too, so one more than the parts.
                    if self.delimiters_seen > self.max_parts + 1 {
                        return Err(MultipartLimit::TooManyParts(self.max_parts));
                    }
                    self.in_headers = Some(0);
                }
                Some(seen) => match memchr::memmem::find(&data[pos..], HEADER_END) {
                    Some(at) => {
                        if seen + at > self.max_header_bytes {
                            return Err(MultipartLimit::HeadersTooLong(self.max_header_bytes));
                        }
                        pos += at + HEADER_END.len();
                        self.in_headers = None;
                    }
                    None => {
                        // Everything past `pos` is header bytes, but the last few may begin
                        // the end marker and are counted again with the next chunk.
                        let keep = HEADER_END.len() - 1;
                        let counted = (data.len() - pos).saturating_sub(keep);
                        if seen + counted > self.max_header_bytes {
                            return Err(MultipartLimit::HeadersTooLong(self.max_header_bytes));
                        }
                        self.in_headers = Some(seen + counted);
                        pos += counted;
                        break;
                    }
                },
            }
        }
        // Keep what a match could still start in: at most a delimiter's length less one.
        let keep = match self.in_headers {
            None => self.delimiter.len() - 1,
            Some(_) => HEADER_END.len() - 1,
        };
        let start = pos.max(data.len().saturating_sub(keep));
        self.tail = data[start..].to_vec();
        Ok(())
    }
}

/// A body stream that fails with [`MultipartLimit`] once the multipart body it carries passes
/// a cap.
pub struct Guarded<S> {
    inner: S,
    scanner: Scanner,
    failed: bool,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, boundary: &str, max_parts: usize, max_header_bytes: usize) -> Self {
        Self { inner, scanner: Scanner::new(boundary, max_parts, max_header_bytes), failed: false }
    }
}

impl<S, E> Stream for Guarded<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => match self.scanner.feed(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(e) => {
                    self.failed = true;
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: usize, header_pad: usize) -> Vec<u8> {
        let mut b = vec![];
        for i in 0..parts {
            b.extend(
                format!(
                    "--XB\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\nX-Pad: {}\r\n\r\n",
                    "p".repeat(header_pad)
                )
                .bytes(),
            );
            b.extend(b"payload bytes that mention --X and \r\n\r\n freely");
            b.extend(b"\r\n");
        }
        b.extend(b"--XB--\r\n");
        b
    }

    /// Feeds `bytes` in chunks of `size`.
    fn scan(bytes: &[u8], size: usize, max_parts: usize, max_header: usize) -> Result<usize, MultipartLimit> {
        let mut s = Scanner::new("XB", max_parts, max_header);
        for c in bytes.chunks(size) {
            s.feed(c)?;
        }
        Ok(s.delimiters_seen)
    }

    #[test]
    fn counts_parts_whatever_the_chunking() {
        let b = body(5, 10);
        for size in [1, 2, 3, 5, 7, 64, 4096] {
            assert_eq!(scan(&b, size, 5, 200), Ok(6), "chunks of {size}");
            assert_eq!(scan(&b, size, 4, 200), Err(MultipartLimit::TooManyParts(4)), "chunks of {size}");
        }
    }

    #[test]
    fn refuses_long_headers_before_they_end() {
        let b = body(2, 500);
        for size in [1, 3, 64, 4096] {
            assert!(scan(&b, size, 10, 2000).is_ok(), "chunks of {size}");
            assert_eq!(scan(&b, size, 10, 300), Err(MultipartLimit::HeadersTooLong(300)), "chunks of {size}");
        }
        // Headers that never end are refused once the cap is passed, not at the end of the body.
        let mut endless = b"--XB\r\nContent-Disposition: form-data; name=\"files\"\r\nX: ".to_vec();
        let mut s = Scanner::new("XB", 10, 1024);
        s.feed(&endless).unwrap();
        endless = vec![b'a'; 600];
        s.feed(&endless).unwrap();
        assert_eq!(s.feed(&endless), Err(MultipartLimit::HeadersTooLong(1024)));
        assert!(s.tail.len() < 8, "the guard holds only a few bytes");
    }
}
