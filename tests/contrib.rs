//! The files in contrib/ against the binary they ship: the man page lists exactly the
//! flags `--help` lists (so it cannot go stale) and renders without warnings, the
//! systemd unit passes `systemd-analyze verify` and keeps its exposure score, and the
//! OpenWrt init script parses and builds a command line the binary accepts. No root.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{PROXY_BIN, tool_or_skip};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(path)
}

const MAN_PAGE: &str = "man/man8/uringproxy.8";
const UNIT: &str = "systemd/uringproxy.service";
const INIT_SCRIPT: &str = "openwrt/uringproxy/files/uringproxy.init";

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"))
}

/// The long flags `uringproxy ARGS --help` lists: its option lines are indented by two
/// spaces, their continuations by more (and those may name other flags).
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    let args: Vec<&str> = args.iter().copied().chain(["--help"]).collect();
    let out = output(PROXY_BIN, &args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let options = text
        .split_once("\nOptions:\n")
        .unwrap_or_else(|| panic!("no options in {args:?}:\n{text}"))
        .1;
    let flags: BTreeSet<String> = options
        .lines()
        .filter(|line| line.starts_with("  -") && !line.starts_with("   "))
        .flat_map(long_flags)
        .collect();
    assert!(flags.contains("--help"), "{args:?}:\n{text}");
    flags
}

/// The `--flag` words of a line, with roff's font escapes and `\-` undone.
fn long_flags(line: &str) -> Vec<String> {
    let mut plain = line.replace("\\-", "-");
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        plain = plain.replace(font, "");
    }
    plain
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(str::to_string)
        .collect()
}

/// The long flags the man page documents in each part: the tags of `.TP` paragraphs
/// in OPTIONS (the proxy), and in its subsections for `demo` and `status`.
fn man_flags() -> [BTreeSet<String>; 3] {
    let page = fs::read_to_string(contrib(MAN_PAGE)).unwrap();
    let mut parts: [BTreeSet<String>; 3] = Default::default();
    let mut part = None;
    let mut lines = page.lines();
    while let Some(line) = lines.next() {
        if let Some(heading) = line.strip_prefix(".SH ").or(line.strip_prefix(".SS ")) {
            part = match heading.trim_matches('"') {
                "OPTIONS" => Some(0),
                "uringproxy demo" => Some(1),
                "uringproxy status" => Some(2),
                _ => None,
            };
        } else if line == ".TP"
            && let Some(part) = part
        {
            let tag = lines.next().unwrap_or_default();
            let flags = long_flags(tag);
            assert!(!flags.is_empty(), "a .TP in OPTIONS without a flag: {tag}");
            parts[part].extend(flags);
        }
    }
    parts
}

#[test]
fn the_man_page_documents_exactly_the_flags_of_help() {
    let [run, demo, status] = man_flags();
    for (documented, args) in [(run, &[][..]), (demo, &["demo"]), (status, &["status"])] {
        let listed = help_flags(args);
        let missing: Vec<_> = listed.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&listed).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "contrib/{MAN_PAGE} vs `uringproxy {} --help`: not documented {missing:?}, \
             documented but not in --help {extra:?}",
            args.join(" ")
        );
    }
}

#[test]
fn the_flag_parsers_see_what_they_should() {
    assert_eq!(
        long_flags(r".BR \-i \fB\-\-interface\fR ... see \-\-user) x"),
        ["--interface", "--user"]
    );
    // Option lines of --help, not their continuations, which may name other flags.
    let flags = help_flags(&["status"]);
    assert!(
        flags.contains("--top") && !flags.contains("--user"),
        "{flags:?}"
    );
}

#[test]
fn the_man_page_renders_without_warnings() {
    const TEST: &str = "the_man_page_renders_without_warnings";
    let page = contrib(MAN_PAGE);
    let page = page.to_str().unwrap();
    if tool_or_skip("groff", TEST) {
        let out = output("groff", &["-man", "-ww", "-z", page]);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if tool_or_skip("man", TEST) {
        let out = Command::new("man")
            .args(["--warnings", "-l", page])
            .env("MANWIDTH", "80")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "man: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("EXIT STATUS"));
    }
}

/// A copy of the unit whose ExecStart names the binary just built (verify checks that
/// it exists), in a directory of its own.
fn unit_copy(name: &str) -> (PathBuf, PathBuf) {
    let unit = fs::read_to_string(contrib(UNIT)).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/uringproxy "));
    let unit = unit.replace("/usr/local/bin/uringproxy", PROXY_BIN);
    let dir = std::env::temp_dir().join(format!("uringproxy-{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("uringproxy.service");
    fs::write(&path, unit).unwrap();
    (dir, path)
}

#[test]
fn the_systemd_unit_passes_verify() {
    const TEST: &str = "the_systemd_unit_passes_verify";
    if !tool_or_skip("systemd-analyze", TEST) || !tool_or_skip("man", TEST) {
        return;
    }
    let (dir, unit) = unit_copy("verify");
    // Documentation=man:uringproxy(8) is checked too: man finds the page in contrib/.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=yes", unit.to_str().unwrap()])
        .env("MANPATH", contrib("man"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_systemd_unit_keeps_its_exposure_score() {
    const TEST: &str = "the_systemd_unit_keeps_its_exposure_score";
    if !tool_or_skip("systemd-analyze", TEST) {
        return;
    }
    let (dir, unit) = unit_copy("security");
    // 1.9 with systemd 252 (docs/operations.md); the threshold is in tenths.
    let out = output(
        "systemd-analyze",
        &[
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            unit.to_str().unwrap(),
        ],
    );
    fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Overall exposure level"), "{text}");
}

/// What `start_service` of the init script hands procd for `config`, a UCI section
/// given as shell code that stubs the UCI and procd functions, one argument a line.
fn init_script_command(config: &str) -> Vec<String> {
    let stubs = r#"
        procd_open_instance() { :; }
        procd_close_instance() { :; }
        procd_set_param() {
            [ "$1" = command ] || return 0
            shift
            for arg in "$@"; do printf '%s\n' "$arg"; done
        }
        procd_append_param() { procd_set_param "$@"; }
        config_load() { :; }
        config_foreach() { "$1" main; }
        config_get() { eval "$1=\${cfg_$3:-$4}"; }
        config_get_bool() { config_get "$@"; }
        config_list_foreach() {
            local values fn value
            eval "values=\$list_$2"
            fn="$3"
            shift 3
            for value in $values; do "$fn" "$value" "$@"; done
        }
        network_get_device() { eval "$1=eth9"; }
    "#;
    let script = format!(
        "{stubs}\n{config}\n. {init}\nstart_service() {{ config_foreach start_instance; }}\n\
         start_service",
        init = contrib(INIT_SCRIPT).display()
    );
    let out = output("sh", &["-c", &script]);
    assert!(
        out.status.success(),
        "init script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_openwrt_init_script_parses_and_builds_a_command_the_binary_accepts() {
    let script = contrib(INIT_SCRIPT);
    let out = output("sh", &["-n", script.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "sh -n: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(init_script_command("cfg_enabled=0").is_empty());
    let mut config = String::from(
        "cfg_enabled=1 cfg_network=wan cfg_tun=up0 cfg_no_offload=1 \
         cfg_memory_limit=16M cfg_metrics=127.0.0.1:9464 \
         list_route='0.0.0.0/0 ::/0' list_extra_arg='--mtu 1400'",
    );
    // --lan and --exclude (gateway routing) are checked once the binary has them.
    let help = help_flags(&[]);
    let gateway = help.contains("--lan") && help.contains("--exclude");
    if gateway {
        config.push_str(" list_lan=br-lan list_exclude=192.0.2.0/24");
    }
    let command = init_script_command(&config);
    let mut expected = vec![
        "/usr/bin/uringproxy",
        "-i",
        "eth9",
        "--tun",
        "up0",
        "--route",
        "0.0.0.0/0",
        "--route",
        "::/0",
    ];
    if gateway {
        expected.splice(5..5, ["--lan", "br-lan"]);
        expected.extend(["--exclude", "192.0.2.0/24"]);
    }
    expected.extend([
        "--memory-limit",
        "16M",
        "--metrics",
        "127.0.0.1:9464",
        "--no-offload",
        "--mtu",
        "1400",
    ]);
    assert_eq!(command, expected);
    // The binary parses it: --version prints once every flag parsed.
    let args: Vec<&str> = command[1..]
        .iter()
        .map(String::as_str)
        .chain(["--version"])
        .collect();
    let out = output(PROXY_BIN, &args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
