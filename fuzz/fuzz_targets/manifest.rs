//! The job manifest parser (`vmfarm_proto::Manifest::parse`): any text a user submits.
//!
//! Besides not panicking: every error points at a line and column inside the text (counted
//! from 1), errors come in the order of the text, and a manifest that parses keeps the
//! promises of its type (at least one image, none repeated, at least one task).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfarm_proto::Manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Manifest::parse(text) {
        Ok(manifest) => {
            assert!(!manifest.images.is_empty(), "a manifest without images");
            let mut images = manifest.images.clone();
            images.sort();
            images.dedup();
            assert_eq!(images.len(), manifest.images.len(), "repeated images");
            assert!(!manifest.tasks.is_empty(), "a manifest without tasks");
            let _ = manifest.summary();
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without a message");
            // One line more than `lines()` gives: a position at the very end of the text.
            let lines = text.split('\n').count();
            for e in &errors.0 {
                assert!(e.line >= 1 && e.column >= 1, "{e}");
                assert!(e.line <= lines, "{e}: the text has {lines} lines");
                assert!(!e.message.is_empty());
            }
            let positions: Vec<(usize, usize)> =
                errors.0.iter().map(|e| (e.line, e.column)).collect();
            assert!(
                positions.is_sorted(),
                "errors out of the text's order: {positions:?}"
            );
            let _ = errors.render("job.toml");
        }
    }
});
