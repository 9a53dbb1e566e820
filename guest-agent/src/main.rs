//! vmfarm-agent: the guest's first process and its SSH server.
fn main() {}
