//! `vmfarm ssh`: a shell or a command in a job's guest, through the server. The user's CLI and
//! the worker each open an HTTP/1.1 upgrade to the server (`Upgrade: vmfarm-ssh`: the CLI at
//! `GET /api/jobs/{id}/ssh`, the worker at `GET /api/leases/{id}/tunnels/{tunnel}` once a long
//! poll of `POST /api/leases/{id}/tunnels` names the tunnel); the server joins the two byte
//! streams. Over them go [`Frame`]s: the CLI sends [`Frame::Open`] first, then stdin, window
//! sizes and EOF; the worker answers with output and the exit status. A frame is a tag byte, a
//! big-endian `u32` length and that many bytes, at most [`MAX_FRAME`].

use serde::{Deserialize, Serialize};

/// The `Upgrade` protocol of both ends.
pub const PROTOCOL: &str = "vmfarm-ssh";

/// The largest frame payload either end sends or takes.
pub const MAX_FRAME: usize = 64 * 1024;

/// What the session runs: a command, or the user's login shell; with a terminal or without.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
}

/// The user's terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pty {
    /// `$TERM`.
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// CLI -> guest, first: what to run.
    Open(Open),
    Stdin(Vec<u8>),
    /// The terminal's new size.
    Resize {
        cols: u16,
        rows: u16,
    },
    /// No more stdin.
    Eof,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The session ended with this status (the command's, or 255 when it did not say).
    Exit(u32),
    /// The session could not be opened, or broke: why.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("a malformed {0} frame")]
    Malformed(&'static str),
}

impl Frame {
    fn tag(&self) -> u8 {
        match self {
            Frame::Open(_) => 1,
            Frame::Stdin(_) => 2,
            Frame::Resize { .. } => 3,
            Frame::Eof => 4,
            Frame::Stdout(_) => 5,
            Frame::Stderr(_) => 6,
            Frame::Exit(_) => 7,
            Frame::Failed(_) => 8,
        }
    }

    /// The frame's bytes. Data longer than [`MAX_FRAME`] must be split by the sender
    /// ([`Frame::data_frames`]).
    pub fn encode(&self) -> Vec<u8> {
        let payload: Vec<u8> = match self {
            Frame::Open(open) => serde_json::to_vec(open).unwrap_or_default(),
            Frame::Stdin(d) | Frame::Stdout(d) | Frame::Stderr(d) => d.clone(),
            Frame::Resize { cols, rows } => [cols.to_be_bytes(), rows.to_be_bytes()].concat(),
            Frame::Eof => Vec::new(),
            Frame::Exit(status) => status.to_be_bytes().to_vec(),
            Frame::Failed(why) => why.as_bytes().to_vec(),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(self.tag());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// `data` as frames made by `make` (`Frame::Stdout`...), each at most [`MAX_FRAME`].
    pub fn data_frames(data: &[u8], make: fn(Vec<u8>) -> Frame) -> impl Iterator<Item = Frame> {
        data.chunks(MAX_FRAME).map(move |c| make(c.to_vec()))
    }

    /// The first whole frame at the start of `buf`, and how many bytes it took; `None` when
    /// `buf` does not hold a whole frame yet.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(header) = buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let Some(payload) = buf.get(5..5 + len) else {
            return Ok(None);
        };
        let frame = match tag {
            1 => Frame::Open(
                serde_json::from_slice(payload).map_err(|_| FrameError::Malformed("open"))?,
            ),
            2 => Frame::Stdin(payload.to_vec()),
            3 => match payload {
                [c0, c1, r0, r1] => Frame::Resize {
                    cols: u16::from_be_bytes([*c0, *c1]),
                    rows: u16::from_be_bytes([*r0, *r1]),
                },
                _ => return Err(FrameError::Malformed("resize")),
            },
            4 => Frame::Eof,
            5 => Frame::Stdout(payload.to_vec()),
            6 => Frame::Stderr(payload.to_vec()),
            7 => match payload {
                [a, b, c, d] => Frame::Exit(u32::from_be_bytes([*a, *b, *c, *d])),
                _ => return Err(FrameError::Malformed("exit")),
            },
            8 => Frame::Failed(String::from_utf8_lossy(payload).into_owned()),
            other => return Err(FrameError::UnknownTag(other)),
        };
        Ok(Some((frame, 5 + len)))
    }
}

/// Frames read from a byte stream in pieces: bytes go in with [`FrameReader::push`], whole
/// frames come out of [`FrameReader::next_frame`]; it never holds more than one frame's bytes and one
/// read's.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match Frame::decode(&self.buf)? {
            Some((frame, used)) => {
                self.buf.drain(..used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frames_round_trip_and_arrive_in_pieces() {
        let frames = [
            Frame::Open(Open {
                command: Some("uname -a".into()),
                pty: Some(Pty {
                    term: "xterm".into(),
                    cols: 80,
                    rows: 24,
                }),
            }),
            Frame::Stdin(b"ls\n".to_vec()),
            Frame::Resize {
                cols: 120,
                rows: 40,
            },
            Frame::Eof,
            Frame::Stdout(vec![0; 100]),
            Frame::Stderr(b"oops".to_vec()),
            Frame::Exit(3),
            Frame::Failed("gone".into()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        let mut reader = FrameReader::default();
        let mut out = Vec::new();
        for byte in bytes {
            reader.push(&[byte]);
            while let Some(frame) = reader.next_frame().unwrap() {
                out.push(frame);
            }
        }
        assert_eq!(out, frames);
    }

    #[test]
    fn test_a_frame_over_the_limit_or_of_no_kind_is_refused() {
        let mut huge = vec![5u8];
        huge.extend_from_slice(&((MAX_FRAME + 1) as u32).to_be_bytes());
        assert_eq!(
            Frame::decode(&huge),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
        assert_eq!(
            Frame::decode(&[9, 0, 0, 0, 0]),
            Err(FrameError::UnknownTag(9))
        );
        assert_eq!(
            Frame::decode(&[3, 0, 0, 0, 1, 0]),
            Err(FrameError::Malformed("resize"))
        );
        let split: Vec<Frame> =
            Frame::data_frames(&vec![1; MAX_FRAME + 10], Frame::Stdout).collect();
        assert_eq!(split.len(), 2);
    }
}
