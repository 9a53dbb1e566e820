//! The values bound to statements, the same for reads and writes: `$N` takes `args[N - 1]`.

/// A value bound to a statement. NULLs keep their type: PostgreSQL needs it.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Blob(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Blob(v)
    }
}

/// An [`Arg`] that owns its value, so that a write of its own can carry it to the writer.
#[derive(Debug, Clone)]
pub(super) enum OwnedArg {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Vec<u8>),
}

impl OwnedArg {
    pub(super) fn new(arg: &Arg<'_>) -> OwnedArg {
        match *arg {
            Arg::Int(v) => OwnedArg::Int(v),
            Arg::Text(v) => OwnedArg::Text(v.map(str::to_owned)),
            Arg::Blob(v) => OwnedArg::Blob(v.to_vec()),
        }
    }

    pub(super) fn arg(&self) -> Arg<'_> {
        match self {
            OwnedArg::Int(v) => Arg::Int(*v),
            OwnedArg::Text(v) => Arg::Text(v.as_deref()),
            OwnedArg::Blob(v) => Arg::Blob(v),
        }
    }
}
