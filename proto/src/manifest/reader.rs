//! Reading a spanned TOML tree with errors that carry line, column and a fix.

use super::{ManifestError, ManifestErrors};
use std::ops::Range;
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

pub(super) type Value<'i> = Spanned<DeValue<'i>>;

/// Collects every error found while reading one manifest.
pub(super) struct Reader<'s> {
    source: &'s str,
    errors: Vec<ManifestError>,
}

impl<'s> Reader<'s> {
    pub(super) fn new(source: &'s str) -> Self {
        Reader {
            source,
            errors: Vec::new(),
        }
    }

    pub(super) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_column(self.source, span.start);
        self.errors.push(ManifestError {
            line,
            column,
            message: message.into(),
        });
    }

    /// The 1-based line and column of a byte offset of the manifest.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        line_column(self.source, offset)
    }

    pub(super) fn finish<T>(mut self, value: T) -> Result<T, ManifestErrors> {
        if self.errors.is_empty() {
            return Ok(value);
        }
        self.errors.sort_by_key(|e| (e.line, e.column));
        Err(ManifestErrors(self.errors))
    }

    /// Refuses keys of `table` that are not in `allowed`, suggesting the nearest allowed one.
    pub(super) fn check_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], place: &str) {
        self.check_keys_but(table, allowed, &[], place);
    }

    /// [`Self::check_keys`], leaving alone the keys in `refused_elsewhere` (refused by the
    /// caller with a message of their own).
    pub(super) fn check_keys_but(
        &mut self,
        table: &DeTable<'_>,
        allowed: &[&str],
        refused_elsewhere: &[&str],
        place: &str,
    ) {
        for key in table.keys() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) || refused_elsewhere.contains(&name) {
                continue;
            }
            let message = match nearest(name, allowed) {
                Some(near) => format!("unknown key `{name}` {place}: did you mean `{near}`?"),
                None => format!(
                    "unknown key `{name}` {place}: the keys allowed there are {}",
                    allowed
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            self.error(key.span(), message);
        }
    }

    fn wrong_type(&mut self, value: &Value<'_>, key: &str, wanted: &str, example: &str) {
        self.error(
            value.span(),
            format!(
                "{} must be {wanted}, not {}: write it like {example}",
                subject(key),
                describe(value.get_ref())
            ),
        );
    }

    pub(super) fn string(&mut self, value: &Value<'_>, key: &str, example: &str) -> Option<String> {
        match value.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.wrong_type(value, key, "a string", example);
                None
            }
        }
    }

    pub(super) fn integer(&mut self, value: &Value<'_>, key: &str, example: &str) -> Option<i64> {
        match value.get_ref() {
            DeValue::Integer(int) => match i64::from_str_radix(int.as_str(), int.radix()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error(value.span(), format!("`{key}` is too large a number"));
                    None
                }
            },
            _ => {
                self.wrong_type(value, key, "an integer", example);
                None
            }
        }
    }

    pub(super) fn table<'a, 'i>(
        &mut self,
        value: &'a Value<'i>,
        key: &str,
        example: &str,
    ) -> Option<&'a DeTable<'i>> {
        match value.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.wrong_type(value, key, "a table", example);
                None
            }
        }
    }

    pub(super) fn array<'a, 'i>(
        &mut self,
        value: &'a Value<'i>,
        key: &str,
        example: &str,
    ) -> Option<&'a DeArray<'i>> {
        match value.get_ref() {
            DeValue::Array(a) => Some(a),
            _ => {
                self.wrong_type(value, key, "an array", example);
                None
            }
        }
    }

    /// An array with at most `max` items (the limit named in the error).
    pub(super) fn bounded_array<'a, 'i>(
        &mut self,
        value: &'a Value<'i>,
        key: &str,
        example: &str,
        max: usize,
    ) -> Option<&'a DeArray<'i>> {
        let array = self.array(value, key, example)?;
        if array.len() > max {
            self.error(
                value.span(),
                format!(
                    "`{key}` has {} entries; the limit is {max}: remove {}",
                    array.len(),
                    array.len() - max
                ),
            );
            return None;
        }
        Some(array)
    }

    /// An array of strings, each kept with its span.
    pub(super) fn strings(
        &mut self,
        value: &Value<'_>,
        key: &str,
        example: &str,
        max: usize,
    ) -> Vec<(String, Range<usize>)> {
        let Some(array) = self.bounded_array(value, key, example, max) else {
            return Vec::new();
        };
        array
            .iter()
            .filter_map(|item| {
                let s = self.string(item, &format!("each entry of `{key}`"), example)?;
                Some((s, item.span()))
            })
            .collect()
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `key` quoted, unless it is already a phrase that quotes its key ("each entry of `tags`").
fn subject(key: &str) -> String {
    if key.contains('`') {
        key.to_owned()
    } else {
        format!("`{key}`")
    }
}

fn describe(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The allowed key closest to `given`, if any is close enough to be a likely typo.
fn nearest<'a>(given: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let lower = given.to_ascii_lowercase();
    allowed
        .iter()
        .map(|&k| (k, strsim::damerau_levenshtein(&lower, k)))
        .filter(|&(k, d)| d <= 2.max(k.len() / 3) && d < k.len())
        .min_by_key(|&(k, d)| (d, k.len().abs_diff(given.len())))
        .map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_line_column_counts_characters() {
        let src = "a = 1\nbé = 2\n";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 6), (2, 1));
        assert_eq!(line_column(src, src.find('=').unwrap()), (1, 3));
        let second_eq = src.rfind('=').unwrap();
        assert_eq!(line_column(src, second_eq), (2, 4));
        assert_eq!(line_column(src, 10_000), (3, 1));
    }

    #[test]
    fn test_nearest_key() {
        let keys = ["image", "images", "timeout", "tasks", "artifacts"];
        assert_eq!(nearest("imagse", &keys), Some("images"));
        assert_eq!(nearest("timout", &keys), Some("timeout"));
        assert_eq!(nearest("Tasks", &keys), Some("tasks"));
        assert_eq!(nearest("artefacts", &keys), Some("artifacts"));
        assert_eq!(nearest("zzzzzz", &keys), None);
    }
}
