//! `-o table|json|yaml`. Every command builds JSON values (camelCase keys, the same for JSON
//! and YAML) and names the columns its table shows; the table is aligned plain text with
//! upper-case headers, as kubectl and antctl print them.

use std::io::Write;

use serde_json::Value;

/// Output format of a `get` or `dump`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON (a list is an array).
    Json,
    /// YAML.
    Yaml,
}

/// A table column: the header and the key of the value it shows.
pub type Column = (&'static str, &'static str);

/// The text of a cell: strings as they are, `-` for missing or empty values, other values in
/// JSON.
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| cell(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    }
}

/// Writes `rows` (already cells) under `headers`, aligned.
pub fn table(out: &mut dyn Write, headers: &[String], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |out: &mut dyn Write, cells: &[String]| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.extend(std::iter::repeat_n(' ', w[i] - c.chars().count() + 2));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, headers)?;
    for r in rows {
        line(out, r)?;
    }
    Ok(())
}

/// Prints `value` as JSON or YAML.
pub fn document(out: &mut dyn Write, value: &Value, f: Format) -> anyhow::Result<()> {
    match f {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
        Format::Yaml => write!(out, "{}", serde_yaml_ng::to_string(value)?)?,
        Format::Table => unreachable!("tables are printed by `list` or `object`"),
    }
    Ok(())
}

/// Prints a list of objects: a table of `columns`, or the whole list.
pub fn list(
    out: &mut dyn Write,
    items: &[Value],
    columns: &[Column],
    f: Format,
) -> anyhow::Result<()> {
    if f != Format::Table {
        return document(out, &Value::Array(items.to_vec()), f);
    }
    let headers: Vec<String> = columns.iter().map(|(h, _)| (*h).to_owned()).collect();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|it| columns.iter().map(|(_, k)| cell(it.get(*k))).collect())
        .collect();
    table(out, &headers, &rows)?;
    Ok(())
}

/// Prints one object: a FIELD/VALUE table of `fields` (in this order), or the whole object.
pub fn object(out: &mut dyn Write, v: &Value, fields: &[Column], f: Format) -> anyhow::Result<()> {
    if f != Format::Table {
        return document(out, v, f);
    }
    let rows: Vec<Vec<String>> = fields
        .iter()
        .map(|(h, k)| vec![(*h).to_owned(), cell(v.get(*k))])
        .collect();
    table(out, &["FIELD".into(), "VALUE".into()], &rows)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_are_aligned_and_empty_cells_are_dashes() {
        let mut out = Vec::new();
        let items = vec![
            json!({"name": "a", "ip": "10.0.0.1"}),
            json!({"name": "longer", "ip": ""}),
        ];
        list(
            &mut out,
            &items,
            &[("NAME", "name"), ("IP", "ip")],
            Format::Table,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME    IP\na       10.0.0.1\nlonger  -\n"
        );
    }

    #[test]
    fn lists_are_arrays_in_json_and_yaml() {
        let items = vec![json!({"name": "a"})];
        let mut out = Vec::new();
        list(&mut out, &items, &[], Format::Json).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!([{"name": "a"}]));
        let mut out = Vec::new();
        list(&mut out, &items, &[], Format::Yaml).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "- name: a\n");
    }
}
