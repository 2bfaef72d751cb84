//! Reading prediction files: JSON Lines, one object per row with a string `prediction` and
//! either a string `reference` or a non-empty list of strings `references`. Other fields are
//! ignored; blank lines are skipped. Every error is one line naming the file, the line and the
//! field.
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn parse_row(line: &str) -> std::result::Result<(String, Vec<String>), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| {
        // serde_json says "... at line 1 column N"; the line is ours, keep only the column.
        let msg = e.to_string();
        let msg = msg
            .rsplit_once(" at line ")
            .map_or(msg.as_str(), |(m, _)| m);
        format!("invalid JSON at column {}: {msg}", e.column())
    })?;
    let Value::Object(obj) = &v else {
        return Err(format!("expected a JSON object, got {}", kind(&v)));
    };
    let prediction = match obj.get("prediction") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(format!(
                "field `prediction` must be a string, got {}",
                kind(other)
            ))
        }
        None => return Err("missing field `prediction`".into()),
    };
    let references = match (obj.get("reference"), obj.get("references")) {
        (Some(_), Some(_)) => {
            return Err("has both `reference` and `references`; give one of them".into())
        }
        (None, None) => {
            return Err(
                "missing field `reference` (a string) or `references` (a list of strings)".into(),
            )
        }
        (Some(Value::String(s)), None) => vec![s.clone()],
        (Some(other), None) => {
            return Err(format!(
                "field `reference` must be a string, got {}",
                kind(other)
            ))
        }
        (None, Some(Value::Array(items))) => {
            if items.is_empty() {
                return Err("field `references` is an empty list".into());
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(format!(
                        "field `references[{i}]` must be a string, got {}",
                        kind(other)
                    )),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?
        }
        (None, Some(other)) => {
            return Err(format!(
                "field `references` must be a list of strings, got {}",
                kind(other)
            ))
        }
    };
    Ok((prediction, references))
}

/// `(prediction, references)` rows of a JSONL file (see the module docs for the format).
pub fn read_predictions(path: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let content = crate::fsutil::read_input_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row =
            parse_row(line).map_err(|what| Error::file(path, format!("line {}: {what}", i + 1)))?;
        let refs: Vec<&str> = row.1.iter().map(String::as_str).collect();
        super::rouge::check_lcs_size(&row.0, &refs)
            .map_err(|what| Error::file(path, format!("line {}: {what}", i + 1)))?;
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(Error::file(
            path,
            "no prediction rows (the file is empty; expected one JSON object per line)",
        ));
    }
    Ok(rows)
}
