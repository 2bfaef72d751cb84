//! Dataset readers: JSONL, JSON, CSV/TSV and Parquet, each row a `serde_json::Map`.
//!
//! Every row keeps its [`Loc`] (line for text formats read line by line, row for JSON arrays and
//! Parquet), so errors later in the pipeline name the file and the line.
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::Source;
use crate::{Error, Result};

/// Where a row is in its file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loc {
    /// A line of the file (JSONL, CSV: the line the record starts on).
    Line(usize),
    /// An element of a JSON array or a Parquet row.
    Row(usize),
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::Line(n) => write!(f, "line {n}"),
            Loc::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// One record of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub loc: Loc,
    pub fields: Map<String, Value>,
}

/// The rows of one file.
#[derive(Debug, Clone)]
pub struct Rows {
    pub file: Arc<Path>,
    pub rows: Vec<Row>,
}

impl Rows {
    pub fn source(&self, row: &Row) -> Source {
        Source {
            file: self.file.clone(),
            loc: row.loc,
            task: None,
        }
    }
}

/// A dataset file format. Without an explicit one, [`Format::from_path`] reads the extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Json,
    Csv,
    Tsv,
    Parquet,
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl" | "ndjson") => Ok(Format::Jsonl),
            Some("json") => Ok(Format::Json),
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            Some("parquet" | "pq") => Ok(Format::Parquet),
            _ => Err(Error::file(
                path,
                "cannot tell the format from the extension \
                 (set format = \"jsonl\", \"json\", \"csv\", \"tsv\" or \"parquet\")",
            )),
        }
    }
}

/// Read every row of a file. `format` overrides the extension. An empty dataset is an error.
pub fn read_rows(path: &Path, format: Option<Format>) -> Result<Rows> {
    // A missing file is named as missing, not as a file of unknown format.
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::file(path, "no such file"))
        }
        Err(e) => return Err(Error::file(path, e)),
        Ok(_) => {}
    }
    let format = match format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    // a folder or a device (`/dev/zero`) is refused before any reader starts on it
    crate::fsutil::input_size_limit(path)?;
    let rows = match format {
        Format::Jsonl => read_jsonl(path)?,
        Format::Json => read_json(path)?,
        Format::Csv => read_csv(path, b',')?,
        Format::Tsv => read_csv(path, b'\t')?,
        Format::Parquet => read_parquet(path)?,
    };
    if rows.is_empty() {
        return Err(Error::file(path, "no rows (the dataset is empty)"));
    }
    Ok(Rows {
        file: Arc::from(path),
        rows,
    })
}

/// A text file, without the UTF-8 byte order mark some editors write (JSON parsers reject it).
fn read_text(path: &Path) -> Result<String> {
    let text = crate::fsutil::read_input_text(path)?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// The JSON type of a value, for "expected X, found Y" messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let loc = Loc::Line(i + 1);
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => rows.push(Row { loc, fields }),
            Ok(other) => {
                return Err(Error::file(
                    path,
                    format!("{loc}: expected a JSON object, found {}", type_name(&other)),
                ))
            }
            Err(e) => return Err(Error::file(path, format!("{loc}: invalid JSON: {e}"))),
        }
    }
    Ok(rows)
}

fn read_json(path: &Path) -> Result<Vec<Row>> {
    let text = read_text(path)?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut m) => match m.remove("data") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(Error::file(
                    path,
                    "expected an array of objects or {\"data\": [...]}, found an object without a `data` array",
                ))
            }
        },
        other => {
            return Err(Error::file(
                path,
                format!(
                    "expected an array of objects or {{\"data\": [...]}}, found {}",
                    type_name(&other)
                ),
            ))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let loc = Loc::Row(i + 1);
            match v {
                Value::Object(fields) => Ok(Row { loc, fields }),
                other => Err(Error::file(
                    path,
                    format!("{loc}: expected a JSON object, found {}", type_name(&other)),
                )),
            }
        })
        .collect()
}

/// CSV or TSV with a header row; every cell is a string (templates render text anyway, and
/// guessing numbers would turn "007" into 7).
///
/// TSV is read as GLUE writes it: one record per line, no quoting, so a `"` in a sentence is
/// text (MNLI and QQP sentences have quotes that are not CSV quoting).
fn read_csv(path: &Path, delimiter: u8) -> Result<Vec<Row>> {
    let tsv = delimiter == b'\t';
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| p.line());
        let what = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!(
                "{len} fields, but the header has {expected_len} ({})",
                if tsv {
                    "fields are separated by tabs"
                } else {
                    "fields are separated by commas; quote a field that contains one"
                }
            ),
            _ => crate::error::first_line(&e.to_string()),
        };
        match line {
            Some(n) => Error::file(path, format!("line {n}: {what}")),
            None => Error::file(path, what),
        }
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(!tsv)
        .has_headers(true)
        .from_path(path)
        .map_err(|e| Error::file(path, crate::error::first_line(&e.to_string())))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(csv_err)?
        .iter()
        .map(str::to_string)
        .collect();
    for (i, name) in header.iter().enumerate() {
        if header[..i].contains(name) {
            return Err(Error::file(
                path,
                format!("line 1: column `{name}` appears twice in the header"),
            ));
        }
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let fields = header
            .iter()
            .zip(record.iter())
            .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
            .collect();
        rows.push(Row {
            loc: Loc::Line(line),
            fields,
        });
    }
    Ok(rows)
}

/// Parquet through arrow record batches. String, integer, float, boolean, list and struct
/// columns (nested freely, e.g. chat `messages: list<struct<role, content>>`) and dictionary
/// encoded strings become JSON; other types are an error naming the column.
fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let perr = |e: &dyn fmt::Display| Error::file(path, crate::error::first_line(&e.to_string()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| perr(&e))?
        .build()
        .map_err(|e| perr(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| perr(&e))?;
        let schema = batch.schema();
        let base = rows.len();
        for i in 0..batch.num_rows() {
            let loc = Loc::Row(base + i + 1);
            let mut fields = Map::new();
            for (field, col) in schema.fields().iter().zip(batch.columns()) {
                let v = arrow_value(col.as_ref(), i).map_err(|what| {
                    Error::file(path, format!("{loc}: column `{}`: {what}", field.name()))
                })?;
                fields.insert(field.name().clone(), v);
            }
            rows.push(Row { loc, fields });
        }
    }
    Ok(rows)
}

fn arrow_value(arr: &dyn arrow_array::Array, i: usize) -> std::result::Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::DataType as D;
    if arr.is_null(i) {
        return Ok(Value::Null);
    }
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match arr.data_type() {
        D::Null => Value::Null,
        D::Boolean => Value::Bool(arr.as_boolean().value(i)),
        D::Int8 => arr.as_primitive::<Int8Type>().value(i).into(),
        D::Int16 => arr.as_primitive::<Int16Type>().value(i).into(),
        D::Int32 => arr.as_primitive::<Int32Type>().value(i).into(),
        D::Int64 => arr.as_primitive::<Int64Type>().value(i).into(),
        D::UInt8 => arr.as_primitive::<UInt8Type>().value(i).into(),
        D::UInt16 => arr.as_primitive::<UInt16Type>().value(i).into(),
        D::UInt32 => arr.as_primitive::<UInt32Type>().value(i).into(),
        D::UInt64 => arr.as_primitive::<UInt64Type>().value(i).into(),
        D::Float16 => float(arr.as_primitive::<Float16Type>().value(i).to_f64()),
        D::Float32 => float(arr.as_primitive::<Float32Type>().value(i) as f64),
        D::Float64 => float(arr.as_primitive::<Float64Type>().value(i)),
        D::Utf8 => arr.as_string::<i32>().value(i).into(),
        D::LargeUtf8 => arr.as_string::<i64>().value(i).into(),
        D::Utf8View => arr.as_string_view().value(i).into(),
        D::List(_) => list(arr.as_list::<i32>().value(i).as_ref())?,
        D::LargeList(_) => list(arr.as_list::<i64>().value(i).as_ref())?,
        D::FixedSizeList(_, _) => list(arr.as_fixed_size_list().value(i).as_ref())?,
        D::Struct(fields) => {
            let s = arr.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                let v = arrow_value(col.as_ref(), i)
                    .map_err(|what| format!("field `{}`: {what}", f.name()))?;
                m.insert(f.name().clone(), v);
            }
            Value::Object(m)
        }
        D::Dictionary(_, _) => {
            let d = arr.as_any_dictionary();
            let key = d.normalized_keys()[i];
            arrow_value(d.values().as_ref(), key)?
        }
        other => {
            return Err(format!(
            "type {other} is not supported (string, number, boolean, list and struct columns are)"
        ))
        }
    })
}

fn list(values: &dyn arrow_array::Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|j| arrow_value(values, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;
    use serde_json::json;

    fn fields(rows: &Rows) -> Vec<Value> {
        rows.rows
            .iter()
            .map(|r| Value::Object(r.fields.clone()))
            .collect()
    }

    #[test]
    fn jsonl_rows_keep_their_line_numbers() {
        let d = TempDir::new("read-jsonl");
        let p = d.write(
            "a.jsonl",
            "\u{feff}{\"x\": 1}\r\n\n{\"x\": \"two\", \"y\": [1]}\n",
        );
        let rows = read_rows(&p, None).unwrap();
        assert_eq!(
            fields(&rows),
            vec![json!({"x": 1}), json!({"x": "two", "y": [1]})]
        );
        assert_eq!(rows.rows[1].loc, Loc::Line(3));
        assert_eq!(
            rows.source(&rows.rows[1]).to_string(),
            format!("{}: line 3", p.display())
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let d = TempDir::new("read-jsonl-err");
        let p = d.write("bad.jsonl", "{\"x\": 1}\n{\"x\": \n");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("bad.jsonl") && e.contains("line 2: invalid JSON"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
        let p = d.write("arr.jsonl", "{\"x\": 1}\n[1, 2]\n");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("line 2: expected a JSON object, found an array"),
            "{e}"
        );
        let p = d.write("empty.jsonl", "\n\n");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");
    }

    #[test]
    fn json_reads_arrays_and_data_objects() {
        let d = TempDir::new("read-json");
        let p = d.write("a.json", "[{\"q\": \"a\"}, {\"q\": \"b\"}]");
        assert_eq!(
            fields(&read_rows(&p, None).unwrap()),
            vec![json!({"q": "a"}), json!({"q": "b"})]
        );
        let p = d.write("b.json", "{\"version\": 1, \"data\": [{\"q\": \"c\"}]}");
        let rows = read_rows(&p, None).unwrap();
        assert_eq!(fields(&rows), vec![json!({"q": "c"})]);
        assert_eq!(rows.rows[0].loc, Loc::Row(1));
        let p = d.write("c.json", "[{\"q\": 1}, 7]");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("c.json") && e.contains("row 2: expected a JSON object, found a number"),
            "{e}"
        );
        let p = d.write("d.json", "{\"rows\": []}");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(e.contains("`data` array"), "{e}");
        let p = d.write("e.json", "[]");
        assert!(read_rows(&p, None)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn csv_reads_quoted_multiline_cells_as_strings() {
        let d = TempDir::new("read-csv");
        let p = d.write(
            "a.csv",
            "id,dialogue,summary\n007,\"#P1#: hi,\n#P2#: \"\"yo\"\"\",greet\n8,x,y\n",
        );
        let rows = read_rows(&p, None).unwrap();
        assert_eq!(
            fields(&rows),
            vec![
                json!({"id": "007", "dialogue": "#P1#: hi,\n#P2#: \"yo\"", "summary": "greet"}),
                json!({"id": "8", "dialogue": "x", "summary": "y"}),
            ]
        );
        // The second record starts on line 4 because the first spans lines 2-3.
        assert_eq!(rows.rows[0].loc, Loc::Line(2));
        assert_eq!(rows.rows[1].loc, Loc::Line(4));
        let p = d.write("b.tsv", "a\tb\n1\t2\n");
        assert_eq!(
            fields(&read_rows(&p, None).unwrap()),
            vec![json!({"a": "1", "b": "2"})]
        );
    }

    #[test]
    fn csv_errors_name_the_line() {
        let d = TempDir::new("read-csv-err");
        let p = d.write("bad.csv", "a,b\n1,2\n3\n");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(e.contains("bad.csv") && e.contains("line 3"), "{e}");
        let p = d.write("dup.csv", "a,a\n1,2\n");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(e.contains("column `a` appears twice"), "{e}");
        let p = d.write("head.csv", "a,b\n");
        assert!(read_rows(&p, None)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn format_comes_from_extension_or_is_explicit() {
        let d = TempDir::new("read-fmt");
        let p = d.write("rows.txt", "{\"a\": 1}\n");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(e.contains("rows.txt") && e.contains("format ="), "{e}");
        assert_eq!(
            fields(&read_rows(&p, Some(Format::Jsonl)).unwrap()),
            vec![json!({"a": 1})]
        );
    }

    /// Writes a Parquet file with the parquet crate's own writer (snappy, two row groups) and
    /// reads it back: strings, numbers, nulls, booleans and a chat-style list of structs.
    #[test]
    fn parquet_columns_become_json() {
        use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
        use arrow_array::{
            ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
        };
        use arrow_schema::{DataType, Field, Fields};
        use parquet::arrow::ArrowWriter;
        use parquet::basic::Compression;
        use parquet::file::properties::WriterProperties;

        let msg_fields = Fields::from(vec![
            Field::new("role", DataType::Utf8, true),
            Field::new("content", DataType::Utf8, true),
        ]);
        let mut messages = ListBuilder::new(StructBuilder::from_fields(msg_fields.clone(), 0));
        for convo in [
            vec![("user", "hi"), ("assistant", "hello")],
            vec![("user", "bye")],
            vec![],
        ] {
            let s = messages.values();
            for (role, content) in convo {
                s.field_builder::<StringBuilder>(0)
                    .unwrap()
                    .append_value(role);
                s.field_builder::<StringBuilder>(1)
                    .unwrap()
                    .append_value(content);
                s.append(true);
            }
            messages.append(true);
        }
        let columns: Vec<ArrayRef> = vec![
            std::sync::Arc::new(StringArray::from(vec![Some("a"), None, Some("c")])),
            std::sync::Arc::new(Int64Array::from(vec![1, -2, 3])),
            std::sync::Arc::new(Float64Array::from(vec![0.5, 1.5, 2.5])),
            std::sync::Arc::new(BooleanArray::from(vec![true, false, true])),
            std::sync::Arc::new(messages.finish()),
        ];
        let batch = RecordBatch::try_from_iter(
            ["text", "n", "score", "ok", "messages"]
                .into_iter()
                .zip(columns),
        )
        .unwrap();
        let d = TempDir::new("read-parquet");
        let path = d.path("t.parquet");
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(2))
            .build();
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            batch.schema(),
            Some(props),
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();

        let rows = read_rows(&path, None).unwrap();
        assert_eq!(
            fields(&rows),
            vec![
                json!({"text": "a", "n": 1, "score": 0.5, "ok": true,
                       "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
                json!({"text": null, "n": -2, "score": 1.5, "ok": false,
                       "messages": [{"role": "user", "content": "bye"}]}),
                json!({"text": "c", "n": 3, "score": 2.5, "ok": true, "messages": []}),
            ]
        );
        assert_eq!(rows.rows[2].loc, Loc::Row(3));

        let p = d.write("broken.parquet", "PAR1 not really");
        let e = read_rows(&p, None).unwrap_err().to_string();
        assert!(e.contains("broken.parquet"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn parquet_unsupported_column_names_row_and_column() {
        use arrow_array::{ArrayRef, BinaryArray, RecordBatch};
        use parquet::arrow::ArrowWriter;
        let col: ArrayRef = std::sync::Arc::new(BinaryArray::from(vec![b"\x00\x01".as_ref()]));
        let batch = RecordBatch::try_from_iter([("blob", col)]).unwrap();
        let d = TempDir::new("read-parquet-bin");
        let path = d.path("b.parquet");
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let e = read_rows(&path, None).unwrap_err().to_string();
        assert!(
            e.contains("b.parquet")
                && e.contains("row 1: column `blob`")
                && e.contains("not supported"),
            "{e}"
        );
    }
}
