//! HTTP/1.x request heads parsed with `httparse`, bounded: the head (request line and
//! headers) at most [`MAX_HEAD`] bytes whether or not it is complete, at most
//! [`MAX_HEADERS`] headers, one `Content-Length` of at most [`MAX_BODY`], no
//! `Transfer-Encoding`. Responses are whole byte strings, written by the server without
//! ever blocking.

use devices::limits::{self, Cap};

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Headers accepted in one request.
pub const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target, e.g. `/v1/iommu?last=4`.
    pub path: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// Bytes of the buffer the request used (anything after it was sent early).
    pub used: usize,
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Partial,
    /// A request.
    Done(Request),
    /// A request that is refused with this status and message.
    Error(u16, String),
}

/// Parses the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                limits::hit(Cap::ApiHead);
                return Parsed::Error(431, format!("request head larger than {MAX_HEAD} bytes"));
            }
            return Parsed::Partial;
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Error(431, format!("more than {MAX_HEADERS} headers"))
        }
        Err(httparse::Error::Version) => {
            return Parsed::Error(505, "only HTTP/1.0 and HTTP/1.1 are supported".into())
        }
        Err(e) => return Parsed::Error(400, format!("malformed request: {e}")),
    };
    if head_len > MAX_HEAD {
        limits::hit(Cap::ApiHead);
        return Parsed::Error(431, format!("request head larger than {MAX_HEAD} bytes"));
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Parsed::Error(400, "malformed request line".into());
    };
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Error(
                501,
                "Transfer-Encoding is not supported; send Content-Length".into(),
            );
        }
        if !h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        if length.is_some() {
            return Parsed::Error(400, "more than one Content-Length header".into());
        }
        let text = std::str::from_utf8(h.value).unwrap_or("").trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Parsed::Error(400, "bad Content-Length".into());
        }
        match text.parse::<usize>() {
            Ok(n) if n <= MAX_BODY => length = Some(n),
            _ => {
                limits::hit(Cap::ApiBody);
                return Parsed::Error(413, format!("body larger than {MAX_BODY} bytes"));
            }
        }
    }
    let length = length.unwrap_or(0);
    let Some(end) = head_len.checked_add(length) else {
        return Parsed::Error(413, format!("body larger than {MAX_BODY} bytes"));
    };
    if buf.len() < end {
        return Parsed::Partial;
    }
    Parsed::Done(Request {
        method: method.to_string(),
        path: path.to_string(),
        body: buf[head_len..end].to_vec(),
        used: end,
    })
}

/// The reason phrase of a status.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Internal Server Error",
    }
}

/// A whole response with `Connection: close`.
pub fn response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_limits_hold() {
        assert_eq!(parse(b"GET /v1/vm HTTP/1.1\r\n"), Parsed::Partial);
        match parse(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\nextra") {
            Parsed::Done(r) => {
                assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/vm"));
                assert_eq!((r.body.len(), r.used), (0, 32));
            }
            p => panic!("complete request: {p:?}"),
        }
        let post = b"POST /v1/inject HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":";
        assert_eq!(parse(&post[..post.len() - 1]), Parsed::Partial);
        assert!(matches!(parse(post), Parsed::Done(r) if r.body == b"{\"a\":"));
        let mut big_head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big_head.extend(std::iter::repeat_n(b'a', 70 * 1024));
        let mut complete_big_head = big_head.clone();
        complete_big_head.extend_from_slice(b"\r\n\r\n");
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let errors: [(&[u8], u16); 11] = [
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"garbage\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (&big_head, 431),
            (&complete_big_head, 431),
            (many.as_bytes(), 431),
        ];
        for (req, want) in errors {
            match parse(req) {
                Parsed::Error(status, _) => {
                    assert_eq!(status, want, "{:.60}", String::from_utf8_lossy(req))
                }
                p => panic!(
                    "{:.60} should be refused with {want}: {p:?}",
                    String::from_utf8_lossy(req)
                ),
            }
        }
        assert!(matches!(parse(b"\xff\xfe\r\n\r\n"), Parsed::Error(400, _)));
    }

    #[test]
    fn responses_are_well_formed() {
        let r = String::from_utf8(response(503, "application/json", "{}")).expect("utf8");
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(r.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n{}"));
    }
}
