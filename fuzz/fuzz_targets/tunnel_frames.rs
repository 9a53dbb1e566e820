//! `vmfarm ssh` frames (`vmfarm_proto::tunnel`): what the worker reads from a user's session and
//! the CLI reads from a guest's, in pieces of any size.
//!
//! Besides not panicking: the reader never holds more than one frame's bytes and one piece, a
//! frame it yields encodes back to bytes it decodes to the same frame, and an error is final
//! for that stream (the ends close it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfarm_proto::tunnel::{Frame, FrameReader, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the size of the pieces the stream arrives in.
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut reader = FrameReader::default();
    for chunk in stream.chunks(piece) {
        reader.push(chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    let bytes = frame.encode();
                    assert!(bytes.len() <= 5 + MAX_FRAME, "a frame over the limit");
                    let again = Frame::decode(&bytes).expect("its own encoding decodes");
                    assert_eq!(again, Some((frame, bytes.len())));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
