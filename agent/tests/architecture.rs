//! The crate's architecture rules, checked on its sources (no root, nothing is built):
//!
//! - The top-level modules (the `pub mod` items of `src/lib.rs`) form no cycle: for each module
//!   the others it names through `crate::…` (or `super::…` reaching the crate root) in code,
//!   not in comments, doc comments or strings. `agent` (the wiring) and `testing` may use any
//!   module, and no other module may use them; test modules (from a `#[cfg(test)]` before a
//!   `mod` to the end of the file) are exempt.
//! - Only files under `src/dataplane/` and `src/agent.rs` name a backend (`dataplane::ebpf`,
//!   `dataplane::ovs`): everything else reaches the dataplane through the `Dataplane` trait.
//! - No library code uses `anyhow` (only `src/main.rs` and `build.rs` may): the library's
//!   errors are typed.
//! - The workspace's crates form no dependency cycle, dev-dependencies included (with one
//!   known exception, see [`KNOWN_DEV_CYCLE_EDGES`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules that may use any other and that no other module may use.
const WIRING: [&str; 2] = ["agent", "testing"];

/// Dev-dependency edges that close a cycle cargo accepts and that are kept on purpose:
/// `ferrea-agent`'s integration tests use the harness `ferrea-tests`, which links the
/// agent's library (a dev-dependency cycle is legal: the library is built first, then the
/// harness, then the agent's test targets).
const KNOWN_DEV_CYCLE_EDGES: [(&str, &str); 1] = [("ferrea-agent", "ferrea-tests")];

#[test]
fn no_cycles_between_top_level_modules() {
    let files = sources();
    let top = top_level_modules();
    for m in WIRING {
        assert!(top.contains(m), "src/lib.rs declares no `pub mod {m}`");
    }
    // module -> used module -> the first place it is used.
    let mut graph: BTreeMap<String, BTreeMap<String, String>> =
        top.iter().map(|m| (m.clone(), BTreeMap::new())).collect();
    let mut wiring_used = Vec::new();
    for f in &files {
        let Some(from) = f.module.first() else {
            continue; // lib.rs: only declares the modules
        };
        if f.rel == "src/main.rs" {
            continue; // the binary: a crate of its own
        }
        for r in &f.refs {
            if r.line >= f.test_start {
                continue;
            }
            let Some(resolved) = resolve(&r.path, &r.module) else {
                continue;
            };
            let Some(to) = resolved.first().filter(|to| top.contains(*to)) else {
                continue;
            };
            if to == from {
                continue;
            }
            let at = format!("{}:{}", f.rel, r.line + 1);
            if WIRING.contains(&to.as_str()) && !WIRING.contains(&from.as_str()) {
                wiring_used.push(format!("{at}: `{from}` uses `crate::{to}`"));
            }
            graph
                .get_mut(from)
                .expect("a top-level module")
                .entry(to.clone())
                .or_insert(at);
        }
    }
    eprintln!("top-level module dependencies (src/):");
    for (m, uses) in &graph {
        eprintln!("  {m} -> {:?}", uses.keys().collect::<Vec<_>>());
    }
    let cycles = cycles(&graph);
    let mut problems = Vec::new();
    for cycle in &cycles {
        let mut s = format!("cycle: {}", cycle.join(" -> "));
        for pair in cycle.windows(2) {
            s += &format!(
                "\n    {} -> {} at {}",
                pair[0], pair[1], graph[&pair[0]][&pair[1]]
            );
        }
        problems.push(s);
    }
    if !wiring_used.is_empty() {
        problems.push(format!(
            "only {WIRING:?} may use {WIRING:?} (outside `#[cfg(test)]` modules):\n    {}",
            wiring_used.join("\n    ")
        ));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn backends_are_named_only_by_the_dataplane_and_the_wiring() {
    let mut offenders = Vec::new();
    for f in sources() {
        // The fakes of a backend's own traits (OVSDB, OpenFlow, BPF maps) live in testing/.
        if f.rel.starts_with("src/dataplane/")
            || f.rel.starts_with("src/testing/")
            || f.rel == "src/agent.rs"
        {
            continue;
        }
        for r in &f.refs {
            let resolved = resolve(&r.path, &r.module);
            let names_backend = |p: &[String]| {
                p.windows(2)
                    .any(|w| w[0] == "dataplane" && (w[1] == "ebpf" || w[1] == "ovs"))
            };
            if names_backend(&r.path) || resolved.as_deref().is_some_and(names_backend) {
                offenders.push(format!("{}:{}: {}", f.rel, r.line + 1, r.path.join("::")));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "only src/dataplane/, src/agent.rs and the fakes in src/testing/ may name a backend; \
         use the Dataplane trait:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn no_anyhow_in_library_code() {
    let mut offenders = Vec::new();
    for f in sources() {
        if f.rel == "src/main.rs" {
            continue;
        }
        for (n, line) in f.code.lines().enumerate() {
            if idents(line).any(|i| i == "anyhow") {
                offenders.push(format!("{}:{}: {}", f.rel, n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "library code must return typed errors; only src/main.rs and build.rs may use anyhow:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn no_dependency_cycle_between_workspace_crates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let members: BTreeSet<String> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect();
    // Normal and build dependencies alone, then with dev-dependencies.
    let mut normal: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut with_dev: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().expect("name").to_owned();
        normal.entry(name.clone()).or_default();
        with_dev.entry(name.clone()).or_default();
        for d in p["dependencies"].as_array().expect("dependencies") {
            let dep = d["name"].as_str().expect("dependency name").to_owned();
            if !members.contains(&dep) || dep == name {
                continue;
            }
            let kind = d["kind"].as_str().unwrap_or("normal").to_owned();
            if kind != "dev" {
                normal
                    .get_mut(&name)
                    .expect("a member")
                    .insert(dep.clone(), kind.clone());
            }
            if !KNOWN_DEV_CYCLE_EDGES.contains(&(name.as_str(), dep.as_str())) {
                with_dev.get_mut(&name).expect("a member").insert(dep, kind);
            }
        }
    }
    let normal_cycles = cycles(&normal);
    assert!(
        normal_cycles.is_empty(),
        "crate dependency cycles (cargo rejects these): {normal_cycles:?}"
    );
    let dev_cycles = cycles(&with_dev);
    assert!(
        dev_cycles.is_empty(),
        "crate dependency cycles through dev-dependencies (besides {KNOWN_DEV_CYCLE_EDGES:?}): \
         {dev_cycles:?}"
    );
}

/// One source file of the crate, cleaned.
struct Source {
    /// Path relative to the crate (`src/…`).
    rel: String,
    /// Module path of the file (`["cni", "server"]`; empty for lib.rs and main.rs).
    module: Vec<String>,
    /// The code with comments and literals blanked out (lines kept).
    code: String,
    /// Line (0-based) where the file's test module starts, or the number of lines.
    test_start: usize,
    /// Every path in the code.
    refs: Vec<PathRef>,
}

/// A path (`crate::pods::Store`, each path of a `use` group separately) found in the code.
struct PathRef {
    path: Vec<String>,
    /// The module it appears in (the file's module plus inline `mod x { … }`).
    module: Vec<String>,
    line: usize,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources() -> Vec<Source> {
    let mut paths = Vec::new();
    collect_rs(&src_dir(), &mut paths);
    paths.sort();
    assert!(
        !paths.is_empty(),
        "no sources under {}",
        src_dir().display()
    );
    let test_files = test_module_files(&paths);
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let rel_src = p.strip_prefix(src_dir()).unwrap();
            let mut module: Vec<String> = rel_src
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            let code = clean(&text);
            // A file that is itself a `#[cfg(test)] mod x;` of its parent is test code whole.
            let test_start = if test_files.contains(&p) {
                0
            } else {
                test_module_start(&text)
            };
            let refs = paths_in(&code, &module);
            Source {
                rel: format!("src/{}", rel_src.display()),
                module,
                code,
                test_start,
                refs,
            }
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The `pub mod` items of src/lib.rs.
fn top_level_modules() -> BTreeSet<String> {
    let code = clean(&std::fs::read_to_string(src_dir().join("lib.rs")).unwrap());
    code.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').trim().to_owned())
        .collect()
}

/// The files of modules declared `#[cfg(test)] mod x;` (out of line) in one of `paths`.
fn test_module_files(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for p in paths {
        let text = std::fs::read_to_string(p).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        // Children of `a/mod.rs` (and lib.rs, main.rs) live in `a/`; of `a/b.rs`, in `a/b/`.
        let dir = match p.file_stem().and_then(|s| s.to_str()) {
            Some("mod" | "lib" | "main") => p.parent().unwrap().to_path_buf(),
            _ => p.with_extension(""),
        };
        for w in lines.windows(2) {
            if w[0] != "#[cfg(test)]" {
                continue;
            }
            let decl = ["mod ", "pub mod ", "pub(crate) mod "]
                .iter()
                .find_map(|pre| w[1].strip_prefix(pre))
                .and_then(|rest| rest.strip_suffix(';'));
            if let Some(name) = decl {
                out.insert(dir.join(format!("{name}.rs")));
                out.insert(dir.join(name).join("mod.rs"));
            }
        }
    }
    out
}

/// The first line of a `#[cfg(test)]` that precedes a `mod` item; the file's length if none.
fn test_module_start(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim() != "#[cfg(test)]" {
            continue;
        }
        let item = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty() && !l.starts_with("#[") && !l.starts_with("//"));
        if item.is_some_and(|l| {
            ["mod ", "pub mod ", "pub(crate) mod "]
                .iter()
                .any(|p| l.starts_with(p))
        }) {
            return i;
        }
    }
    lines.len()
}

/// `text` with comments (doc comments included), string literals and char literals replaced
/// by spaces; newlines are kept, so line numbers stay.
fn clean(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let prev_ident = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (!prev_ident || (i > 0 && c[i - 1] == 'b' && (i < 2 || !c[i - 2].is_alphanumeric())))
            && {
                let mut j = i + 1;
                while c.get(j) == Some(&'#') {
                    j += 1;
                }
                c.get(j) == Some(&'"')
            }
        {
            // Raw string: r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            out.push(' ');
            i += 1;
            while i <= j {
                out.push(' ');
                i += 1;
            }
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && c.get(i + 1) == Some(&'\\') {
            // Escaped char literal: '\n', '\'', '\u{..}': the escaped char, then up to the quote.
            out.push_str("   ");
            i += 3;
            while i < c.len() && c[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' && c.get(i + 2) == Some(&'\'') {
            out.push_str("   ");
            i += 3;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn idents(line: &str) -> impl Iterator<Item = &str> {
    line.split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
        .filter(|s| !s.is_empty())
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

fn tokens(code: &str) -> Vec<(Tok, usize)> {
    let mut out = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let c: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < c.len() {
            if c[i].is_alphanumeric() || c[i] == '_' {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                out.push((Tok::Ident(word), n));
            } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
                out.push((Tok::PathSep, n));
                i += 2;
            } else {
                if !c[i].is_whitespace() {
                    out.push((Tok::Punct(c[i]), n));
                }
                i += 1;
            }
        }
    }
    out
}

/// Every path in `code` (in a file of module `file_module`): `a::b::c`, and for a `use` group
/// `a::{b, c::{d, e}}` each of `a::b`, `a::c::d`, `a::c::e`.
fn paths_in(code: &str, file_module: &[String]) -> Vec<PathRef> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut depth = 0usize;
    // Inline modules: (name, brace depth outside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(w) if w == "mod" => {
                if let (Some((Tok::Ident(name), _)), Some((Tok::Punct('{'), _))) =
                    (toks.get(i + 1), toks.get(i + 2))
                {
                    inline.push((name.clone(), depth));
                }
            }
            Tok::Ident(_)
                if (i == 0 || toks[i - 1].0 != Tok::PathSep)
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep) =>
            {
                let module: Vec<String> = file_module
                    .iter()
                    .cloned()
                    .chain(inline.iter().map(|(m, _)| m.clone()))
                    .collect();
                let line = toks[i].1;
                let mut found = Vec::new();
                let next = parse_tree(&toks, i, Vec::new(), &mut found);
                out.extend(found.into_iter().map(|path| PathRef {
                    path,
                    module: module.clone(),
                    line,
                }));
                // Braces of a use group were consumed: skip over them (they balance).
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Parses a path or use tree at `toks[i]` under `prefix`; pushes the full paths it names and
/// returns the index after it.
fn parse_tree(
    toks: &[(Tok, usize)],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match toks.get(i).map(|t| &t.0) {
            Some(Tok::Ident(w)) => {
                prefix.push(w.clone());
                i += 1;
                if toks.get(i).map(|t| &t.0) == Some(&Tok::PathSep) {
                    i += 1;
                    continue;
                }
                out.push(prefix);
                return i;
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match toks.get(i).map(|t| &t.0) {
                        Some(Tok::Punct('}')) => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        Some(Tok::Ident(w)) if w == "as" => i += 2,
                        Some(Tok::Ident(_)) | Some(Tok::Punct('{')) => {
                            i = parse_tree(toks, i, prefix.clone(), out);
                        }
                        Some(_) => i += 1, // `*`, `self` handled as an ident
                        None => return i,
                    }
                }
            }
            _ => {
                // `a::<T>` or `a::*`: the path ends here.
                if !prefix.is_empty() {
                    out.push(prefix);
                }
                return i;
            }
        }
    }
}

/// The crate-relative path `path` names from module `module`, if it is crate-relative
/// (`crate::…`, `ferrea_agent::…` from the binary, `super::…`, `self::…`).
fn resolve(path: &[String], module: &[String]) -> Option<Vec<String>> {
    let first = path.first()?;
    match first.as_str() {
        "crate" | "ferrea_agent" => Some(path[1..].to_vec()),
        "self" => Some(module.iter().chain(&path[1..]).cloned().collect()),
        "super" => {
            let n = path.iter().take_while(|s| *s == "super").count();
            let base = module.get(..module.len().checked_sub(n)?)?;
            Some(base.iter().chain(&path[n..]).cloned().collect())
        }
        _ => None,
    }
}

/// The cycles of `graph`: one per strongly connected component of more than one node, as the
/// node list `a, b, …, a`.
fn cycles<V>(graph: &BTreeMap<String, BTreeMap<String, V>>) -> Vec<Vec<String>> {
    let reach = |from: &str| -> BTreeMap<String, String> {
        // node -> its predecessor on a shortest path from `from`.
        let mut pred = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([from.to_owned()]);
        while let Some(u) = queue.pop_front() {
            for v in graph.get(&u).into_iter().flat_map(|e| e.keys()) {
                if !pred.contains_key(v) {
                    pred.insert(v.clone(), u.clone());
                    queue.push_back(v.clone());
                }
            }
        }
        pred
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for u in graph.keys() {
        if seen.contains(u) {
            continue;
        }
        let pred = reach(u);
        if !pred.contains_key(u) {
            continue;
        }
        // Walk back from u to u along predecessors.
        let mut cycle = vec![u.clone()];
        let mut at = pred[u].clone();
        while &at != u {
            cycle.push(at.clone());
            at = pred[&at].clone();
        }
        cycle.push(u.clone());
        cycle.reverse();
        // Everything on a cycle with u is in u's component: report it once.
        for v in graph.keys() {
            if v == u || (pred.contains_key(v) && reach(v).contains_key(u)) {
                seen.insert(v.clone());
            }
        }
        out.push(cycle);
    }
    out
}

#[test]
fn the_checker_sees_code_not_comments_or_strings() {
    let code = clean(
        "use crate::pods; // crate::agent\n/* crate::cni */ let s = \"crate::config\";\nlet r = r#\"crate::net\"#; let c = '\"'; fn f<'a>() { crate::kernel::x() }\n",
    );
    let found: Vec<String> = paths_in(&code, &["source".to_owned()])
        .iter()
        .filter_map(|r| resolve(&r.path, &r.module))
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(found, ["pods", "kernel::x"]);
    let grouped = paths_in(
        &clean("use crate::{dataplane::{ebpf, Dataplane as D}, net};\nuse super::ovs::X;\n"),
        &["dataplane".to_owned(), "mod_x".to_owned()],
    );
    let found: Vec<String> = grouped
        .iter()
        .filter_map(|r| resolve(&r.path, &r.module))
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        found,
        [
            "dataplane::ebpf",
            "dataplane::Dataplane",
            "net",
            "dataplane::ovs::X"
        ]
    );
    let mut g: BTreeMap<String, BTreeMap<String, ()>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().insert(b.into(), ());
        g.entry(b.into()).or_default();
    }
    assert_eq!(cycles(&g), [["a", "b", "c", "a"]]);
}
