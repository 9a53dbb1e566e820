//! Secrets out of a job's log, whatever the chunk boundaries: the bytes of each stream are masked
//! as one sequence, so a secret that arrives in two reads is still found. The end of what came
//! so far is held back while it could be the start of a secret or of a UTF-8 character, and sent
//! with what follows it (or at the end of the log).

use vmfarm_proto::wire::LogStream;

/// What a secret becomes in the log.
const MASK: &[u8] = b"***";

/// A stream of the log: the console, the farm's lines, or one task's output.
pub type StreamKey = (LogStream, Option<String>);

pub struct Masker {
    secrets: Vec<Vec<u8>>,
    /// Per stream, bytes not sent yet (already masked of whole secrets).
    held: Vec<(StreamKey, Vec<u8>)>,
}

impl Masker {
    pub fn new(secrets: Vec<Vec<u8>>) -> Masker {
        Masker {
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
            held: Vec::new(),
        }
    }

    /// The text of `key`'s stream that can go out now that `data` followed what was held.
    pub fn push(&mut self, key: &StreamKey, data: &[u8]) -> String {
        let mut bytes = match self.held.iter().position(|(k, _)| k == key) {
            Some(i) => self.held.swap_remove(i).1,
            None => Vec::new(),
        };
        bytes.extend_from_slice(data);
        let mut bytes = self.mask(bytes);
        let keep = bytes.len() - self.sendable_len(&bytes);
        let tail = bytes.split_off(bytes.len() - keep);
        if !tail.is_empty() {
            self.held.push((key.clone(), tail));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Streams that will say nothing more: a task's output ends when another task or the farm
    /// speaks. Their held bytes, which can no longer become a secret, go out.
    pub fn finish_tasks_other_than(&mut self, key: &StreamKey) -> Vec<(StreamKey, String)> {
        let ended = |k: &StreamKey| k.0 == LogStream::Task && k != key;
        let (done, keep): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(k, _)| ended(k));
        self.held = keep;
        done.into_iter()
            .map(|(k, bytes)| (k, String::from_utf8_lossy(&bytes).into_owned()))
            .collect()
    }

    /// Everything still held, at the end of the log.
    pub fn finish(&mut self) -> Vec<(StreamKey, String)> {
        self.held
            .drain(..)
            .map(|(k, bytes)| (k, String::from_utf8_lossy(&bytes).into_owned()))
            .collect()
    }

    fn mask(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        for secret in &self.secrets {
            if find(&bytes, secret, 0).is_none() {
                continue;
            }
            let mut out = Vec::with_capacity(bytes.len());
            let mut from = 0;
            while let Some(at) = find(&bytes, secret, from) {
                out.extend_from_slice(&bytes[from..at]);
                out.extend_from_slice(MASK);
                from = at + secret.len();
            }
            out.extend_from_slice(&bytes[from..]);
            bytes = out;
        }
        bytes
    }

    /// How much of `bytes` can go out: all but the longest end that starts a secret, and never
    /// half a character.
    fn sendable_len(&self, bytes: &[u8]) -> usize {
        let start_of_secret = self
            .secrets
            .iter()
            .flat_map(|s| (1..s.len()).rev().find(|&k| bytes.ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        let cut = bytes.len() - start_of_secret;
        match std::str::from_utf8(&bytes[..cut]) {
            // An incomplete character at the end waits for its other bytes.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            _ => cut,
        }
    }
}

/// Where `needle` first occurs in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str) -> StreamKey {
        (LogStream::Task, Some(name.to_owned()))
    }

    fn masker() -> Masker {
        Masker::new(vec![b"hunter2".to_vec(), b"tok".to_vec(), Vec::new()])
    }

    #[test]
    fn test_whole_secrets_are_masked() {
        let mut m = masker();
        assert_eq!(
            m.push(&task("t"), b"pw=hunter2 tok tok\n"),
            "pw=*** *** ***\n"
        );
        assert_eq!(m.push(&task("t"), b"nothing here\n"), "nothing here\n");
        assert!(m.finish().is_empty());
    }

    #[test]
    fn test_a_secret_split_across_reads_is_masked() {
        let mut m = masker();
        let key = task("t");
        // Every split point of the same output gives the same masked text.
        let output = b"pw=hunter2 and tok.\n";
        for cut in 0..=output.len() {
            let mut got = m.push(&key, &output[..cut]);
            got += &m.push(&key, &output[cut..]);
            got += &m.finish().into_iter().map(|(_, t)| t).collect::<String>();
            assert_eq!(got, "pw=*** and ***.\n", "split at {cut}");
        }
        // Byte by byte, nothing of the secret ever goes out.
        let mut sent = String::new();
        for b in b"x hunter2 y" {
            sent += &m.push(&key, &[*b]);
            assert!(!sent.contains("hunt"), "{sent}");
        }
        assert_eq!(sent, "x *** y");
    }

    #[test]
    fn test_held_bytes_wait_for_what_follows_or_the_end() {
        let mut m = masker();
        let key = task("t");
        assert_eq!(m.push(&key, b"ends with hunt"), "ends with ");
        // The console is another stream: what it says does not complete the task's secret.
        assert_eq!(m.push(&(LogStream::Console, None), b"er2"), "er2");
        assert_eq!(m.push(&key, b"ing\n"), "hunting\n");
        assert_eq!(m.push(&key, b"to"), "");
        let farm = (LogStream::Farm, None);
        assert_eq!(
            m.finish_tasks_other_than(&farm),
            [(key.clone(), "to".to_owned())]
        );
        assert_eq!(m.push(&key, b"last h"), "last ");
        assert_eq!(m.finish(), [(key, "h".to_owned())]);
    }

    #[test]
    fn test_characters_split_across_reads_stay_whole() {
        let mut m = Masker::new(Vec::new());
        let key = (LogStream::Console, None);
        let text = "grüße ✓\n".as_bytes();
        let mut got = String::new();
        for b in text {
            got += &m.push(&key, &[*b]);
        }
        assert_eq!(got, "grüße ✓\n");
        // Bytes that are not UTF-8 at all are replaced, not held.
        assert_eq!(m.push(&key, b"a\xffb"), "a\u{fffd}b");
    }
}
