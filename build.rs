//! Link flags of the `vmfarm` binary.

fn main() {
    // The VMM's code first in the text (see the script): a VMM process maps fewer pages.
    let layout = concat!(env!("CARGO_MANIFEST_DIR"), "/vmm-text-first.ld");
    println!("cargo:rerun-if-changed={layout}");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{layout}");

    // A static musl build is a static PIE: at every start it applies its own relocations, some
    // 60,000 of them (pointers in vtables, string tables and panic locations). As RELA entries
    // they take 1.4 MiB that each process reads; packed as DT_RELR (musl 1.2.4+, GNU ld 2.38+,
    // lld) they take a few KiB. This keeps ASLR and trims every VMM process's start and RSS.
    if std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("musl") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
