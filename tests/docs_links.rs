//! The README and the pages in docs/ link each other by relative paths and heading
//! anchors; a page moved or a heading renamed must not leave a link leading nowhere.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The anchor GitHub gives a heading: lower case, punctuation other than `-` and `_`
/// dropped, spaces made hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text outside fenced code blocks, which hold commands and output, not links.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn anchors(page: &Path) -> HashSet<String> {
    let text = fs::read_to_string(page).unwrap();
    prose(&text)
        .lines()
        .filter_map(|line| {
            let hashes = line.len() - line.trim_start_matches('#').len();
            (1..=6)
                .contains(&hashes)
                .then(|| line[hashes..].strip_prefix(' '))?
        })
        .map(slug)
        .collect()
}

/// Every `](target)` of `text`.
fn targets(text: &str) -> Vec<&str> {
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            rest.find(')').map(|end| &rest[..end])
        })
        .collect()
}

/// What is wrong with the relative links of `page`, one line each.
fn broken_links(page: &Path) -> Vec<String> {
    let text = prose(&fs::read_to_string(page).unwrap());
    let mut broken = Vec::new();
    for target in targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
        let file = if path.is_empty() {
            page.to_path_buf()
        } else {
            page.parent().unwrap().join(path)
        };
        if !file.exists() {
            broken.push(format!("{}: {target}: no such file", page.display()));
        } else if !anchor.is_empty()
            && file.extension().is_some_and(|e| e == "md")
            && !anchors(&file).contains(anchor)
        {
            broken.push(format!("{}: {target}: no such heading", page.display()));
        }
    }
    broken
}

fn pages() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages
}

#[test]
fn relative_links_in_the_readme_and_docs_lead_somewhere() {
    let pages = pages();
    assert!(pages.len() > 1, "no pages in docs/");
    let broken: Vec<String> = pages.iter().flat_map(|p| broken_links(p)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_checker_finds_a_missing_file_and_a_missing_heading() {
    let dir = std::env::temp_dir().join(format!("uringproxy-docs-links-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let page = dir.join("page.md");
    fs::write(
        &page,
        "# A router's `LAN`\n[ok](#a-routers-lan) [gone](missing.md) [no](#nowhere)\n\
         ```\n[in code](ignored.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&page);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(broken.len(), 2, "{broken:?}");
    assert!(
        broken[0].ends_with("missing.md: no such file"),
        "{broken:?}"
    );
    assert!(
        broken[1].ends_with("#nowhere: no such heading"),
        "{broken:?}"
    );
}
