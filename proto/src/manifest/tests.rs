use super::*;
use crate::units::{GIB, MIB};

const FULL: &str = r#"images = ["debian-12", "debian-13"]
timeout = "30m"
priority = 5
tags = ["nightly", "scheduled:nightly"]
secrets = ["deploy-key"]

[resources]
cpus = 2
memory = "1GiB"

[environment]
CC = "gcc"

[[sources]]
url = "https://example.org/project.git"
ref = "main"
path = "project"

[[tasks]]
name = "build"
timeout = "10m"
script = """
cd project
make -j"$(nproc)"
"""

[[artifacts]]
path = "project/out/app"

[[triggers]]
on = "failure"
webhook = "http://127.0.0.1:9000/hook"
"#;

const MINIMAL: &str = "image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";

/// A valid manifest with `extra` from line 2, between its image and its task.
fn with(extra: &str) -> String {
    format!("image = \"tiny\"\n{extra}\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
}

/// Parses `text`, expects exactly one error at `line:col` whose message contains every `want`.
#[track_caller]
fn assert_error(text: &str, line: usize, column: usize, want: &[&str]) {
    let errors = Manifest::parse(text)
        .expect_err("manifest should be refused")
        .0;
    assert_eq!(
        errors.len(),
        1,
        "expected one error, got {errors:#?}\nfor:\n{text}"
    );
    let e = &errors[0];
    assert_eq!(
        (e.line, e.column),
        (line, column),
        "{}\nfor:\n{text}",
        e.message
    );
    for w in want {
        assert!(e.message.contains(w), "{:?} lacks {w:?}", e.message);
    }
}

#[test]
fn test_full_example_parses() {
    let m = Manifest::parse(FULL).unwrap();
    assert_eq!(m.images, ["debian-12", "debian-13"]);
    assert_eq!(m.timeout, Some(Duration::from_secs(1800)));
    assert_eq!(m.priority, 5);
    assert_eq!(
        m.priority_at,
        Some(At {
            line: 3,
            column: 12
        })
    );
    assert_eq!(m.tags, ["nightly", "scheduled:nightly"]);
    assert_eq!(m.secret_names(), ["deploy-key"]);
    assert_eq!(
        m.secrets[0].at,
        At {
            line: 5,
            column: 12
        }
    );
    assert_eq!(m.resources.cpus, Some(2));
    assert_eq!(m.resources.memory, Some(ByteSize(GIB)));
    assert_eq!(m.environment.get("CC").map(String::as_str), Some("gcc"));
    assert_eq!(
        m.sources,
        [Source {
            url: "https://example.org/project.git".into(),
            git_ref: Some("main".into()),
            path: "project".into(),
        }]
    );
    assert_eq!(m.tasks.len(), 1);
    assert_eq!(m.tasks[0].name, "build");
    assert_eq!(m.tasks[0].timeout, Some(Duration::from_secs(600)));
    assert!(m.tasks[0].script.contains("make -j"));
    assert_eq!(m.artifacts[0].path, "project/out/app");
    assert_eq!(m.artifacts[0].when, ArtifactWhen::Success, "the default");
    assert_eq!(m.triggers[0].on, TriggerOn::Failure);
    assert_eq!(
        m.summary(),
        "2 images (debian-12, debian-13), 1 task, 1 source, 1 artifact, timeout 30m"
    );
}

#[test]
fn test_minimal_manifest_takes_defaults() {
    let m = Manifest::parse(MINIMAL).unwrap();
    assert_eq!(m.images, ["tiny"]);
    assert_eq!(m.timeout, None);
    assert_eq!(m.priority, 0);
    assert_eq!(m.resources, Resources::default());
    assert!(m.sources.is_empty() && m.artifacts.is_empty() && m.triggers.is_empty());
}

#[test]
fn test_unknown_keys_suggest_the_nearest() {
    assert_error(
        &with("timout = \"1m\"\n"),
        2,
        1,
        &["unknown key `timout`", "did you mean `timeout`?"],
    );
    assert_error(
        &with("[resources]\ncpu = 2\n"),
        3,
        1,
        &["`cpu` in [resources]", "`cpus`"],
    );
    assert_error(
        "image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscrpit = \"x\"\nscript = \"true\"\n",
        4,
        1,
        &["unknown key `scrpit` in [[tasks]]", "`script`"],
    );
    assert_error(
        &with("[[artifacts]]\npth = \"a\"\npath = \"b\"\n"),
        3,
        1,
        &["`pth`", "`path`"],
    );
    assert_error(
        &with("[[sources]]\nurl = \"/src\"\nbranch = \"x\"\n"),
        4,
        1,
        &["unknown key `branch`", "`url`, `ref`, `path`"],
    );
    assert_error(
        &with("[[triggers]]\non = \"always\"\nwebhok = \"http://h/\"\nwebhook = \"http://h/\"\n"),
        4,
        1,
        &["`webhook`"],
    );
}

#[test]
fn test_syntax_errors_have_positions() {
    let errors = Manifest::parse("image = \"tiny\"\ntasks = [\n")
        .unwrap_err()
        .0;
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.contains("not valid TOML"),
        "{}",
        errors[0].message
    );
    assert_eq!(errors[0].line, 2);
    assert_error(
        "image = \"tiny\"\nimage = \"x\"\n",
        2,
        1,
        &["not valid TOML"],
    );
}

#[test]
fn test_images_rules() {
    assert_error(
        "[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
        1,
        1,
        &["no image is named", "image = \"debian-12\""],
    );
    assert_error(
        "image = \"a\"\nimages = [\"b\"]\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
        2,
        10,
        &["both `image` and `images`"],
    );
    assert_error(
        "images = []\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
        1,
        10,
        &["`images` is empty"],
    );
    assert_error(
        "images = [\"a\", \"a\"]\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
        1,
        16,
        &["appears twice"],
    );
    assert_error(
        "image = \"Debian\"\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
        1,
        9,
        &["image name `Debian`", "lowercase"],
    );
    assert_error(
        "image = 12\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
        1,
        9,
        &["`image` must be a string, not an integer"],
    );
    let many: Vec<String> = (0..17).map(|i| format!("\"i{i}\"")).collect();
    assert_error(
        &format!(
            "images = [{}]\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n",
            many.join(",")
        ),
        1,
        10,
        &["17 entries; the limit is 16"],
    );
}

#[test]
fn test_timeouts_and_priority() {
    assert_error(&with("timeout = \"0s\"\n"), 2, 11, &["zero"]);
    assert_error(&with("timeout = \"25h\"\n"), 2, 11, &["the limit is 1d"]);
    assert_error(
        &with("timeout = \"10 minutes\"\n"),
        2,
        11,
        &["unknown unit"],
    );
    assert_error(
        &with("timeout = 30\n"),
        2,
        11,
        &["must be a string", "timeout = \"30m\""],
    );
    assert_error(
        &with("priority = 5000\n"),
        2,
        12,
        &["between -1000 and 1000"],
    );
    assert_error(
        &with("priority = \"high\"\n"),
        2,
        12,
        &["must be an integer"],
    );
    assert_error(
        "image = \"tiny\"\ntimeout = \"5m\"\n[[tasks]]\nname = \"t\"\ntimeout = \"10m\"\nscript = \"x\"\n",
        5,
        11,
        &["longer than the job's 5m"],
    );
    assert_eq!(
        Manifest::parse(&with("priority = -3\n")).unwrap().priority,
        -3
    );
}

#[test]
fn test_tags_and_secrets() {
    assert_error(&with("tags = [\"Nightly\"]\n"), 2, 9, &["tag `Nightly`"]);
    assert_error(&with("tags = \"nightly\"\n"), 2, 8, &["must be an array"]);
    assert_error(
        &with("secrets = [\"a.b\"]\n"),
        2,
        12,
        &["secret name `a.b`", "contains '.'"],
    );
    assert_error(
        &with("secrets = [1]\n"),
        2,
        12,
        &["each entry of `secrets` must be a string"],
    );
    let many: Vec<String> = (0..33).map(|i| format!("\"t{i}\"")).collect();
    assert_error(
        &with(&format!("tags = [{}]\n", many.join(","))),
        2,
        8,
        &["the limit is 32"],
    );
}

#[test]
fn test_resources() {
    let m = Manifest::parse(&with("[resources]\ncpus = 4\nmemory = \"512MiB\"\n")).unwrap();
    assert_eq!(m.resources.cpus, Some(4));
    assert_eq!(m.resources.memory, Some(ByteSize(512 * MIB)));
    assert_error(
        &with("[resources]\ncpus = 0\n"),
        3,
        8,
        &["between 1 and 64"],
    );
    assert_error(
        &with("[resources]\ncpus = 65\n"),
        3,
        8,
        &["between 1 and 64"],
    );
    assert_error(
        &with("[resources]\nmemory = \"1GB\"\n"),
        3,
        10,
        &["write \"1GiB\""],
    );
    assert_error(
        &with("[resources]\nmemory = \"64MiB\"\n"),
        3,
        10,
        &["between 128MiB and 64GiB"],
    );
    assert_error(
        &with("[resources]\nmemory = \"65GiB\"\n"),
        3,
        10,
        &["between 128MiB and 64GiB"],
    );
    assert_error(&with("resources = 3\n"), 2, 13, &["must be a table"]);
}

#[test]
fn test_environment() {
    assert_error(
        &with("[environment]\nCC = 1\n"),
        3,
        6,
        &["`CC` must be a string", "CC = \"value\""],
    );
    assert_error(
        &with("[environment]\n\"1X\" = \"a\"\n"),
        3,
        1,
        &["not a valid environment variable name"],
    );
    assert_error(
        &with("[environment]\n\"A-B\" = \"a\"\n"),
        3,
        1,
        &["not a valid environment variable name"],
    );
    let long = "x".repeat(5000);
    assert_error(
        &with(&format!("[environment]\nA = \"{long}\"\n")),
        3,
        5,
        &["the limit is 4096"],
    );
    assert_error(&with("[environment]\nA = \"a\\u0000b\"\n"), 3, 5, &["NUL"]);
}

#[test]
fn test_sources() {
    let m = Manifest::parse(&with(
        "[[sources]]\nurl = \"https://h/g/proj.git\"\n[[sources]]\nurl = \"/srv/lib\"\nref = \"v1.0\"\n[[sources]]\nurl = \"http://host/x/y\"\npath = \"deps/y\"\n",
    ))
    .unwrap();
    let paths: Vec<_> = m.sources.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["proj", "lib", "deps/y"]);
    assert_eq!(m.sources[1].git_ref.as_deref(), Some("v1.0"));
    assert_error(
        &with("[[sources]]\npath = \"x\"\n"),
        2,
        1,
        &["[[sources]] has no `url`"],
    );
    assert_error(
        &with("[[sources]]\nurl = \"relative/dir\"\n"),
        3,
        7,
        &["neither a git URL"],
    );
    for (url, what) in [
        ("git@host:x/y", "is an ssh address (user@host:path)"),
        ("ssh://git@host/x", "is an ssh:// URL"),
        ("git://host/x", "is a git:// URL"),
    ] {
        assert_error(
            &with(&format!("[[sources]]\nurl = \"{url}\"\n")),
            3,
            7,
            &[what, "write the repository's https:// URL"],
        );
    }
    assert_error(
        &with("[[sources]]\nurl = \"--upload-pack=x\"\n"),
        3,
        7,
        &["must not start with '-'"],
    );
    assert_error(
        &with("[[sources]]\nurl = \"/a\"\nref = \"-x\"\n"),
        4,
        7,
        &["not starting with '-'"],
    );
    assert_error(
        &with("[[sources]]\nurl = \"/a\"\npath = \"../up\"\n"),
        4,
        8,
        &["may not leave"],
    );
    assert_error(
        &with("[[sources]]\nurl = \"/a/x\"\n[[sources]]\nurl = \"/b/x\"\n"),
        4,
        1,
        &["two sources land at `x`"],
    );
    assert_error(&with("sources = \"x\"\n"), 2, 11, &["must be an array"]);
}

#[test]
fn test_tasks() {
    assert_error("image = \"tiny\"\n", 1, 1, &["no tasks"]);
    assert_error(
        "image = \"tiny\"\ntasks = []\n",
        2,
        9,
        &["`tasks` is empty"],
    );
    assert_error(
        "image = \"tiny\"\n[[tasks]]\nscript = \"x\"\n",
        2,
        1,
        &["has no `name`"],
    );
    assert_error(
        "image = \"tiny\"\n[[tasks]]\nname = \"t\"\n",
        2,
        1,
        &["has no `script`"],
    );
    assert_error(
        "image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"  \"\n",
        4,
        10,
        &["`script` is empty"],
    );
    assert_error(
        "image = \"tiny\"\n[[tasks]]\nname = \"A B\"\nscript = \"x\"\n",
        3,
        8,
        &["task name `A B`"],
    );
    assert_error(
        "image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n[[tasks]]\nname = \"t\"\nscript = \"y\"\n",
        6,
        8,
        &["two tasks are named `t`"],
    );
    let big = "x".repeat(64 * 1024 + 1);
    assert_error(
        &format!("image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"{big}\"\n"),
        4,
        10,
        &["the limit is 65536"],
    );
    let mut many = String::from("image = \"tiny\"\n");
    for i in 0..65 {
        many.push_str(&format!("[[tasks]]\nname = \"t{i}\"\nscript = \"x\"\n"));
    }
    let errors = Manifest::parse(&many).unwrap_err();
    assert!(
        errors.to_string().contains("65 entries; the limit is 64"),
        "{errors}"
    );
}

#[test]
fn test_artifacts_when_and_globs() {
    let m = Manifest::parse(&with(
        "[[artifacts]]\npath = \"logs\"\nwhen = \"always\"\n\
         [[artifacts]]\npath = \"out/*.log\"\nwhen = \"success\"\n",
    ))
    .unwrap();
    let got: Vec<(&str, ArtifactWhen, bool)> = m
        .artifacts
        .iter()
        .map(|a| (a.path.as_str(), a.when, a.is_glob()))
        .collect();
    assert_eq!(
        got,
        [
            ("logs", ArtifactWhen::Always, false),
            ("out/*.log", ArtifactWhen::Success, true)
        ]
    );
    assert_error(
        &with("[[artifacts]]\npath = \"a\"\nwhen = 1\n"),
        4,
        8,
        &["`when` must be a string", "when = \"always\""],
    );
    assert_error(
        &with("[[artifacts]]\npath = \"a/[b\"\n"),
        3,
        8,
        &["not a valid pattern"],
    );
    assert_error(
        &with("[[artifacts]]\npath = \"out/**/x\"\n"),
        3,
        8,
        &["`**`, which is not supported"],
    );
}

#[test]
fn test_artifacts() {
    assert_error(
        &with("[[artifacts]]\npath = \"/etc/passwd\"\n"),
        3,
        8,
        &["relative"],
    );
    assert_error(
        &with("[[artifacts]]\npath = \"a/../../x\"\n"),
        3,
        8,
        &["may not leave"],
    );
    assert_error(
        &with("[[artifacts]]\npath = \"a\"\n[[artifacts]]\npath = \"a\"\n"),
        5,
        8,
        &["listed twice"],
    );
    assert_error(&with("[[artifacts]]\n"), 2, 1, &["has no `path`"]);
    assert_error(
        &with("artifacts = [\"a\"]\n"),
        2,
        14,
        &["each entry of `artifacts` must be a table"],
    );
    let arts: String = (0..65)
        .map(|i| format!("[[artifacts]]\npath = \"a{i}\"\n"))
        .collect();
    let many = with(&arts);
    assert!(
        Manifest::parse(&many)
            .unwrap_err()
            .to_string()
            .contains("the limit is 64")
    );
}

#[test]
fn test_triggers() {
    let m = Manifest::parse(&with(
        "[[triggers]]\non = \"always\"\nwebhook = \"https://h/x\"\n",
    ))
    .unwrap();
    assert_eq!(m.triggers[0].on, TriggerOn::Always);
    assert!(
        TriggerOn::Always.fires(false)
            && TriggerOn::Success.fires(true)
            && !TriggerOn::Failure.fires(true)
    );
    assert_error(
        &with("[[triggers]]\non = \"sometimes\"\nwebhook = \"http://h/\"\n"),
        3,
        6,
        &["\"success\", \"failure\" or \"always\""],
    );
    assert_error(
        &with("[[triggers]]\non = \"always\"\nwebhook = \"ftp://h/\"\n"),
        4,
        11,
        &["not an http(s) URL"],
    );
    assert_error(
        &with("[[triggers]]\non = \"always\"\nwebhook = \"http://\"\n"),
        4,
        11,
        &["not an http(s) URL"],
    );
    assert_error(
        &with("[[triggers]]\nwebhook = \"http://h/\"\n"),
        2,
        1,
        &["has no `on`"],
    );
}

#[test]
fn test_manifest_size_limit() {
    let text = format!("{MINIMAL}# {}\n", "x".repeat(limits::MAX_MANIFEST_BYTES));
    assert_error(&text, 1, 1, &["the limit is 262144"]);
}

#[test]
fn test_every_error_is_reported_in_order() {
    let errors = Manifest::parse("imagse = \"tiny\"\npriority = \"x\"\n[[tasks]]\nname = \"t\"\n")
        .unwrap_err();
    let lines: Vec<_> = errors.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 1, 2, 3], "{errors}");
    let rendered = errors.render("job.toml");
    assert!(rendered.starts_with("job.toml:1:1: "), "{rendered}");
    assert_eq!(rendered.lines().count(), 4);
}

#[test]
fn test_packages_and_network_parse() {
    let m = Manifest::parse(
        "image = \"debian-13\"\npackages = [\"zlib1g-dev\", \"python3-venv=3.11.2-1+b1\"]\n\n[network]\nallow = [\"pypi.org\", \"*.crates.io\",\n  \"static.rust-lang.org:443\", \"*\"]\n\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n",
    )
    .unwrap();
    assert_eq!(m.packages, ["zlib1g-dev", "python3-venv=3.11.2-1+b1"]);
    let network = m.network.as_ref().expect("a [network]");
    let shown: Vec<(String, usize, usize)> = network
        .allow
        .iter()
        .map(|a| (a.pattern.to_string(), a.line, a.column))
        .collect();
    assert_eq!(
        shown,
        [
            ("pypi.org".to_owned(), 5, 10),
            ("*.crates.io".to_owned(), 5, 22),
            ("static.rust-lang.org:443".to_owned(), 6, 3),
            ("*".to_owned(), 6, 31),
        ]
    );
    assert!(network.patterns()[2].matches("static.rust-lang.org", 443));
    assert_eq!(
        m.summary(),
        "1 image (debian-13), 1 task, 2 packages, network to 4 host patterns"
    );
    let few = Manifest::parse(&with("[network]\nallow = [\"PyPI.org\"]\n")).unwrap();
    assert_eq!(
        few.network.unwrap().allow[0].pattern.to_string(),
        "pypi.org"
    );
}

#[test]
fn test_no_network_and_no_packages_by_default() {
    let m = Manifest::parse(MINIMAL).unwrap();
    assert!(m.packages.is_empty());
    assert_eq!(m.network, None);
    assert_eq!(m.summary(), "1 image (tiny), 1 task");
    let empty = Manifest::parse(&with("packages = []\n")).unwrap();
    assert!(empty.packages.is_empty(), "an empty list asks for nothing");
}

#[test]
fn test_bad_packages_say_where_and_what_to_write() {
    assert_error(
        &with("packages = \"zlib1g-dev\"\n"),
        2,
        12,
        &[
            "`packages` must be an array, not a string",
            "packages = [\"zlib1g-dev\", \"python3-venv\"]",
        ],
    );
    assert_error(
        &with("packages = [\"git\", 3]\n"),
        2,
        20,
        &["each entry of `packages` must be a string, not an integer"],
    );
    assert_error(
        &with("packages = [\"git\", \"Zlib1g-dev\"]\n"),
        2,
        20,
        &["package `Zlib1g-dev`", "write `zlib1g-dev`"],
    );
    assert_error(
        &with("packages = [\"-o=APT::Get::Force=1\"]\n"),
        2,
        13,
        &["must start with a lowercase letter or a digit, not '-'"],
    );
    assert_error(
        &with("packages = [\"libc6:i386\"]\n"),
        2,
        13,
        &["contains ':'", "like \"zlib1g-dev\""],
    );
    assert_error(
        &with("packages = [\"git=\"]\n"),
        2,
        13,
        &["write `git` for any version, or `git=VERSION`"],
    );
    assert_error(
        &with("packages = [\"git\", \"git=1:2.39\"]\n"),
        2,
        20,
        &["the package `git` appears twice in `packages`: keep one"],
    );
    let many: Vec<String> = (0..257).map(|i| format!("\"p{i}\"")).collect();
    assert_error(
        &with(&format!("packages = [{}]\n", many.join(","))),
        2,
        12,
        &["257 entries; the limit is 256: remove 1"],
    );
}

#[test]
fn test_no_task_may_be_named_packages() {
    for manifest in [
        "image = \"tiny\"\n[[tasks]]\nname = \"packages\"\nscript = \"true\"\n",
        "image = \"tiny\"\npackages = [\"git\"]\n[[tasks]]\nname = \"packages\"\nscript = \"true\"\n",
    ] {
        let line = manifest
            .lines()
            .position(|l| l.starts_with("name"))
            .unwrap()
            + 1;
        assert_error(
            manifest,
            line,
            8,
            &[
                "a task may not be named `packages`",
                "installs the manifest's `packages`",
                "like `setup`",
            ],
        );
    }
}

#[test]
fn test_bad_network_says_where_and_what_to_write() {
    let cases: &[(&str, usize, usize, &[&str])] = &[
        (
            "[network]\nallow = [\"*example.org\"]\n",
            3,
            10,
            &["[network] allow: `*example.org`: write `*.example.org`"],
        ),
        (
            "[network]\nallow = [\"pypi.org\", \"https://pypi.org/simple\"]\n",
            3,
            22,
            &["`https://pypi.org/simple` is a URL: write the host alone, like `pypi.org`"],
        ),
        (
            "[network]\nallow = [\"pypi.org:70000\"]\n",
            3,
            10,
            &["the port `70000`", "a number from 1 to 65535"],
        ),
        (
            "[network]\nallow = [\"10.0.0.1\"]\n",
            3,
            10,
            &["is an IP address", "`allow_private`"],
        ),
        (
            "[network]\nallow = [\"pypi.org\", \"PyPI.org\"]\n",
            3,
            22,
            &["`pypi.org` appears twice in `allow`: remove one"],
        ),
        (
            "[network]\nallow = \"pypi.org\"\n",
            3,
            9,
            &[
                "`allow` must be an array, not a string",
                "allow = [\"pypi.org\", \"*.crates.io\"]",
            ],
        ),
        (
            "[network]\nallow = [443]\n",
            3,
            10,
            &["each entry of `allow` must be a string, not an integer"],
        ),
        (
            "[network]\nallow = []\n",
            3,
            9,
            &["`allow` is empty", "or remove [network] for no network"],
        ),
        (
            "[network]\nallow = [\"pypi.org\"]\nhosts = [\"pypi.org\"]\n",
            4,
            1,
            &[
                "unknown key `hosts` in [network]",
                "the keys allowed there are `allow`",
            ],
        ),
        (
            "[network]\nallow = [\"pypi.org\"]\nallow_private = [\"10.0.0.0/8\"]\n",
            4,
            1,
            &[
                "`allow_private` is the server's setting, not a job's",
                "server's [network] allow_private; remove it here",
            ],
        ),
        (
            "[network]\nalow = [\"pypi.org\"]\nallow = [\"pypi.org\"]\n",
            3,
            1,
            &["unknown key `alow` in [network]: did you mean `allow`?"],
        ),
        (
            "network = \"pypi.org\"\n",
            2,
            11,
            &[
                "`network` must be a table, not a string",
                "[network] with `allow",
            ],
        ),
        (
            "network = true\n",
            2,
            11,
            &["`network` must be a table, not a boolean"],
        ),
    ];
    for &(extra, line, column, want) in cases {
        assert_error(&with(extra), line, column, want);
    }
    let errors = Manifest::parse(&with("[network]\nallow = [\"pypi.org\"]\nhosts = []\n"))
        .unwrap_err()
        .0;
    assert_eq!(
        errors[0].message, "unknown key `hosts` in [network]: the keys allowed there are `allow`",
        "the server's `allow_private` is not offered"
    );
    let many: Vec<String> = (0..65).map(|i| format!("\"h{i}.org\"")).collect();
    assert_error(
        &with(&format!("[network]\nallow = [{}]\n", many.join(","))),
        3,
        9,
        &["65 entries; the limit is 64"],
    );
}

#[test]
fn test_network_without_allow_points_at_the_table() {
    let errors = Manifest::parse(&with("[network]\n")).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .message
            .contains("[network] has no `allow`: add allow = ["),
        "{}",
        errors[0].message
    );
    assert!(errors[0].line <= 3, "{errors:?}");
}

#[test]
fn test_caches_parse_to_guest_paths() {
    let m = Manifest::parse(&with(
        "[[caches]]\nname = \"pip\"\npaths = [\"~/.cache/pip\", \"venv\"]\nsize = \"2GiB\"\n[[caches]]\nname = \"ccache\"\npaths = [\"~/.ccache\"]\nsize = \"512MiB\"\n",
    ))
    .unwrap();
    assert_eq!(
        m.caches,
        [
            Cache {
                name: "pip".into(),
                paths: vec![
                    "/home/build/.cache/pip".into(),
                    "/home/build/work/venv".into()
                ],
                size: ByteSize(2 * GIB),
            },
            Cache {
                name: "ccache".into(),
                paths: vec!["/home/build/.ccache".into()],
                size: ByteSize(512 * MIB),
            },
        ]
    );
    assert!(m.summary().contains("2 caches"), "{}", m.summary());
    assert!(Manifest::parse(MINIMAL).unwrap().caches.is_empty());
}

#[test]
fn test_bad_caches_say_where_and_what_to_write() {
    let cache = |body: &str| with(&format!("[[caches]]\n{body}\n"));
    assert_error(
        &cache("name = \"pip\"\nsize = \"1GiB\""),
        2,
        1,
        &["[[caches]] has no `paths`", "paths = [\"~/.cache/pip\"]"],
    );
    assert_error(
        &cache("name = \"Pip\"\npaths = [\"~/.cache/pip\"]\nsize = \"1GiB\""),
        3,
        8,
        &["cache name `Pip`", "lowercase"],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = [\"/root/.cache\"]\nsize = \"1GiB\""),
        4,
        10,
        &["cache path `/root/.cache` is absolute", "`~/root/.cache`"],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = [\"~/a\", \"~/a/b\"]\nsize = \"1GiB\""),
        4,
        17,
        &["overlaps /home/build/a"],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = []\nsize = \"1GiB\""),
        4,
        9,
        &["`paths` is empty"],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = [\"~/work\"]\nsize = \"1GiB\""),
        4,
        10,
        &["the build directory itself"],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = [\"x\"]\nsize = \"1MiB\""),
        5,
        8,
        &["`size` is 1MiB; it must be between 64MiB and 64GiB"],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = [\"x\"]\nsize = \"big\""),
        5,
        8,
        &["write it like size = \"2GiB\""],
    );
    assert_error(
        &cache("name = \"pip\"\npaths = [\"x\"]\nsize = \"1GiB\"\nkeep = true"),
        6,
        1,
        &["`keep`"],
    );
    assert_error(
        &with(
            "[[caches]]\nname = \"a\"\npaths = [\"x\"]\nsize = \"1GiB\"\n[[caches]]\nname = \"a\"\npaths = [\"y\"]\nsize = \"1GiB\"\n",
        ),
        7,
        8,
        &["two caches are named `a`"],
    );
}
