//! What the cache keeps, conservatively: a GET without query, body, Range, conditional
//! headers, credentials or `Cache-Control: no-store`, of a path under a Debian archive's `pool/`
//! or `dists/…/by-hash/SHA256|SHA512/<hex>`, answered 200 with one Content-Length and no
//! Content-Encoding, Content-Range, Set-Cookie, `no-store`/`private`, or Vary beyond
//! Accept-Encoding.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use sha2::{Digest, Sha256};

use crate::network::policy::Target;

/// The first path segments of the Debian archives whose files are cached.
const ARCHIVES: [&str; 4] = ["debian", "debian-security", "debian-ports", "debian-debug"];

/// Request headers that make a GET uncacheable.
const UNCACHEABLE_REQUEST: [HeaderName; 9] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::AUTHORIZATION,
    header::COOKIE,
    header::TRANSFER_ENCODING,
];

/// How a complete entry is checked before it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verify {
    Length,
    Sha256([u8; 32]),
    Sha512([u8; 64]),
}

/// A cacheable request: its entry's id and how the entry is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::network) struct CacheKey {
    pub(super) id: String,
    pub(super) verify: Verify,
}

/// The key of `request` to `target` if its answer may be cached.
pub(super) fn key_for<B>(target: &Target, request: &Request<B>) -> Option<CacheKey> {
    let headers = request.headers();
    if request.method() != Method::GET
        || request.uri().query().is_some()
        || UNCACHEABLE_REQUEST.iter().any(|h| headers.contains_key(h))
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length != "0")
        || cache_control_has(headers, "no-store")
    {
        return None;
    }
    let path = request.uri().path();
    let verify = immutable_path(path)?;
    let id = hex::encode(Sha256::digest(format!(
        "{}:{}{path}",
        target.host, target.port
    )));
    Some(CacheKey { id, verify })
}

pub(super) fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether a `Cache-Control` header of `headers` has `directive`.
fn cache_control_has(headers: &HeaderMap, directive: &str) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|part| {
            let name = part.split('=').next().unwrap_or(part);
            name.trim().eq_ignore_ascii_case(directive)
        })
}

/// How to check a file at `path`, if it is one that never changes once published.
fn immutable_path(path: &str) -> Option<Verify> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let safe = |s: &&str| {
        !s.is_empty()
            && *s != "."
            && *s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+~%-".contains(&b))
    };
    if !segments.iter().all(safe) {
        return None;
    }
    let (archive, rest) = segments.split_first()?;
    if !ARCHIVES.contains(archive) {
        return None;
    }
    match rest {
        // pool/<component>/<prefix>/<source>/<file>; the security archive's component is
        // `updates/main`.
        ["pool", files @ ..] if files.len() == 4 || files.len() == 5 => Some(Verify::Length),
        ["dists", suite @ .., "by-hash", algorithm, hash] if !suite.is_empty() => {
            match *algorithm {
                "SHA256" if is_hex(hash, 64) => {
                    let mut digest = [0; 32];
                    hex::decode_to_slice(hash, &mut digest).ok()?;
                    Some(Verify::Sha256(digest))
                }
                "SHA512" if is_hex(hash, 128) => {
                    let mut digest = [0; 64];
                    hex::decode_to_slice(hash, &mut digest).ok()?;
                    Some(Verify::Sha512(digest))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The Content-Length of `response` if the answer may be kept.
pub(super) fn storable_length(response: &hyper::http::response::Parts) -> Option<u64> {
    let headers = &response.headers;
    let identity = |value: &HeaderValue| value.as_bytes().eq_ignore_ascii_case(b"identity");
    let only_encoding = |value: &HeaderValue| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .all(|name| name.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    };
    if response.status != StatusCode::OK
        || headers.contains_key(header::CONTENT_RANGE)
        || headers.contains_key(header::SET_COOKIE)
        || headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !identity(v))
        || headers
            .get_all(header::VARY)
            .iter()
            .any(|v| !only_encoding(v))
        || cache_control_has(headers, "no-store")
        || cache_control_has(headers, "private")
    {
        return None;
    }
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let (Some(length), None) = (lengths.next(), lengths.next()) else {
        return None;
    };
    length.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Response;

    fn target() -> Target {
        Target::parse("deb.debian.org", 80).unwrap()
    }

    #[test]
    fn test_only_immutable_package_files_are_cacheable() {
        let sha256 = "a".repeat(64);
        let sha512 = "b".repeat(128);
        let cases = [
            ("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", true),
            (
                "/debian/pool/main/libz/zlib/zlib1g-dev_1.3.dfsg-3+b1_amd64.deb",
                true,
            ),
            (
                "/debian/pool/main/g/gcc-14/cpp-14_14.2.0-19%2bb1_amd64.deb",
                true,
            ),
            (
                "/debian-security/pool/updates/main/o/openssl/libssl3_3.0.15-1~deb12u1_amd64.deb",
                true,
            ),
            (
                &format!("/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/{sha256}"),
                true,
            ),
            (
                &format!(
                    "/debian-security/dists/trixie-security/main/i18n/by-hash/SHA512/{sha512}"
                ),
                true,
            ),
            (
                "/debian/dists/trixie/main/binary-amd64/by-hash/MD5Sum/0123456789abcdef0123456789abcdef",
                false,
            ),
            (
                &format!(
                    "/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/{}",
                    "A".repeat(64)
                ),
                false,
            ),
            (&format!("/debian/dists/by-hash/SHA256/{sha256}"), false),
            (
                "/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/abc",
                false,
            ),
            ("/debian/dists/trixie/InRelease", false),
            ("/debian/dists/trixie/main/binary-amd64/Packages.xz", false),
            ("/debian/pool/main/h/hello/", false),
            ("/debian/pool/main/h/hello", false),
            ("/debian/pool/main/h/../../../../etc/passwd", false),
            ("/debian/pool/main/h/./hello/x.deb", false),
            ("/debian//pool/main/h/hello/x.deb", false),
            ("/ubuntu/pool/main/h/hello/hello_2.10-3_amd64.deb", false),
            ("/pool/main/h/hello/hello_2.10-3_amd64.deb", false),
            ("/simple/six/", false),
        ];
        for (path, want) in cases {
            let request = Request::get(format!("http://deb.debian.org{path}"))
                .body(())
                .unwrap();
            assert_eq!(key_for(&target(), &request).is_some(), want, "{path}");
        }
    }

    #[test]
    fn test_only_plain_gets_are_cacheable() {
        let url = "http://deb.debian.org/debian/pool/main/h/hello/hello_2.10-3_amd64.deb";
        let plain = Request::get(url).body(()).unwrap();
        assert!(key_for(&target(), &plain).is_some());
        let refused = [
            Request::head(url).body(()).unwrap(),
            Request::post(url).body(()).unwrap(),
            Request::get(format!("{url}?x=1")).body(()).unwrap(),
            Request::get(url)
                .header("range", "bytes=0-99")
                .body(())
                .unwrap(),
            Request::get(url)
                .header("if-range", "\"x\"")
                .body(())
                .unwrap(),
            Request::get(url)
                .header("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT")
                .body(())
                .unwrap(),
            Request::get(url)
                .header("if-none-match", "\"x\"")
                .body(())
                .unwrap(),
            Request::get(url)
                .header("authorization", "Basic eDp5")
                .body(())
                .unwrap(),
            Request::get(url).header("cookie", "a=b").body(()).unwrap(),
            Request::get(url)
                .header("cache-control", "max-age=0, no-store")
                .body(())
                .unwrap(),
            Request::get(url)
                .header("content-length", "5")
                .body(())
                .unwrap(),
        ];
        for request in refused {
            assert!(key_for(&target(), &request).is_none(), "{request:?}");
        }
        // The key tells hosts and ports apart.
        let other_port = Target::parse("deb.debian.org", 8080).unwrap();
        let mirror = Target::parse("ftp.de.debian.org", 80).unwrap();
        let key = key_for(&target(), &plain).unwrap();
        assert_ne!(key_for(&other_port, &plain).unwrap(), key);
        assert_ne!(key_for(&mirror, &plain).unwrap(), key);
    }

    #[test]
    fn test_only_complete_plain_answers_are_kept() {
        let answer = |status: u16, headers: &[(&str, &str)]| {
            let mut builder = Response::builder().status(status);
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            builder.body(()).unwrap().into_parts().0
        };
        let length = ("content-length", "1234");
        assert_eq!(storable_length(&answer(200, &[length])), Some(1234));
        assert_eq!(
            storable_length(&answer(
                200,
                &[
                    length,
                    ("vary", "Accept-Encoding"),
                    ("content-encoding", "identity")
                ]
            )),
            Some(1234)
        );
        let refused = [
            answer(200, &[]),
            answer(206, &[length, ("content-range", "bytes 0-1233/5000")]),
            answer(304, &[length]),
            answer(404, &[length]),
            answer(200, &[length, length]),
            answer(200, &[("content-length", "12x")]),
            answer(200, &[length, ("cache-control", "no-store")]),
            answer(200, &[length, ("cache-control", "public, private")]),
            answer(200, &[length, ("content-encoding", "gzip")]),
            answer(200, &[length, ("set-cookie", "a=b")]),
            answer(200, &[length, ("vary", "cookie")]),
            answer(200, &[length, ("content-range", "bytes 0-1233/1234")]),
        ];
        for parts in refused {
            assert_eq!(storable_length(&parts), None, "{parts:?}");
        }
    }
}
