//! Reading the user's files into raw records: JSONL / JSON (plain, .gz, .zst), CSV / TSV,
//! Parquet, plain text, and directories of any of these (read in parallel, so a folder of
//! 100,000 small files loads in seconds). Bad lines are skipped and reported with `file:line`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::report::Report;
use crate::{Error, Result};

/// One record before its shape is known.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub file: Arc<PathBuf>,
    /// 1-based line (JSONL, CSV), element (JSON array) or row (Parquet); 0 for a whole file.
    pub line: usize,
    pub value: RawValue,
}

/// A record's content.
#[derive(Debug, Clone)]
pub enum RawValue {
    /// A JSON object (or a CSV/Parquet row converted to one).
    Object(Map<String, Value>),
    /// A whole text file (text format).
    Text(String),
}

impl RawRecord {
    /// `file:line` for messages.
    pub fn location(&self) -> String {
        if self.line == 0 {
            self.file.display().to_string()
        } else {
            format!("{}:{}", self.file.display(), self.line)
        }
    }
}

/// The file kinds afinar reads, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Csv(u8),
    Parquet,
    Text,
}

fn kind_of(path: &Path) -> Option<(Kind, Compression)> {
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    let (base, comp) = if let Some(b) = name.strip_suffix(".gz") {
        (b.to_string(), Compression::Gzip)
    } else if let Some(b) = name.strip_suffix(".zst") {
        (b.to_string(), Compression::Zstd)
    } else {
        (name, Compression::None)
    };
    let ext = base.rsplit('.').next()?;
    let kind = match ext {
        "jsonl" | "json" | "ndjson" => Kind::Json,
        "csv" => Kind::Csv(b','),
        "tsv" => Kind::Csv(b'\t'),
        "parquet" => Kind::Parquet,
        "txt" | "md" | "text" => Kind::Text,
        _ => return None,
    };
    Some((kind, comp))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Reads every record under `path` (a file or a directory, recursively). Bad records are
/// skipped into `report`, or are fatal with `strict`.
pub fn read_path(path: &Path, strict: bool, report: &mut Report) -> Result<Vec<RawRecord>> {
    if path.is_dir() {
        let t = std::time::Instant::now();
        let mut files = Vec::new();
        walk(path, &mut files)?;
        files.sort();
        tracing::debug!(
            "listed {} files in {:.3}s",
            files.len(),
            t.elapsed().as_secs_f64()
        );
        let (known, unknown): (Vec<_>, Vec<_>) =
            files.into_iter().partition(|f| kind_of(f).is_some());
        for f in unknown {
            let msg = format!(
                "{}: not a data file (extension not .jsonl/.json/.csv/.tsv/.parquet/.txt)",
                f.display()
            );
            if strict {
                return Err(Error::Data(msg));
            }
            report.skip("unrecognised file extension", msg);
        }
        // Parallel over files; each file keeps its own report, merged in file order so the
        // result is the same whatever the thread count. Small files are bound by I/O latency,
        // not CPU, so more reads are kept in flight than there are cores.
        let read_all = || -> Vec<Result<(Vec<RawRecord>, Report)>> {
            known
                .par_iter()
                .map(|f| {
                    let mut r = Report::default();
                    read_file(f, strict, &mut r).map(|recs| (recs, r))
                })
                .collect()
        };
        // Measured on a folder of 100k files, cold cache, 2 cores: 8 reads in flight 2.1 s,
        // 32 in flight 1.5 s, 64 in flight 1.4 s.
        let io_threads = (rayon::current_num_threads() * 32).clamp(32, 128);
        let results = match rayon::ThreadPoolBuilder::new()
            .num_threads(io_threads)
            .build()
        {
            Ok(pool) if known.len() > 64 => pool.install(read_all),
            _ => read_all(),
        };
        let mut out = Vec::new();
        for res in results {
            let (recs, r) = res?;
            out.extend(recs);
            report.merge(r);
        }
        Ok(out)
    } else if path.is_file() {
        read_file(path, strict, report)
    } else {
        Err(Error::InvalidArgument(format!(
            "{}: no such file or directory",
            path.display()
        )))
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(|e| Error::io(&p, e))?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if ft.is_file() && !entry.file_name().to_string_lossy().starts_with('.') {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads one file according to its extension.
pub fn read_file(path: &Path, strict: bool, report: &mut Report) -> Result<Vec<RawRecord>> {
    let (kind, comp) = kind_of(path).ok_or_else(|| {
        Error::Data(format!(
            "{}: unknown data file type (use .jsonl, .json, .jsonl.gz, .jsonl.zst, .csv, .tsv, .parquet or .txt)",
            path.display()
        ))
    })?;
    let file = Arc::new(path.to_path_buf());
    match kind {
        Kind::Parquet => read_parquet(&file, strict, report),
        _ => {
            let bytes = read_bytes(path, comp)?;
            match kind {
                Kind::Json => read_json(&file, &bytes, strict, report),
                Kind::Csv(delim) => read_csv(&file, &bytes, delim, strict, report),
                Kind::Text => read_text(&file, bytes, strict, report),
                Kind::Parquet => unreachable!(),
            }
        }
    }
}

fn read_bytes(path: &Path, comp: Compression) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    match comp {
        Compression::None => return Ok(raw),
        Compression::Gzip => flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::bad_file(path, format!("not valid gzip: {e}")))?,
        Compression::Zstd => ruzstd::decoding::StreamingDecoder::new(raw.as_slice())
            .map_err(|e| Error::bad_file(path, format!("not valid zstd: {e}")))?
            .read_to_end(&mut out)
            .map_err(|e| Error::bad_file(path, format!("not valid zstd: {e}")))?,
    };
    Ok(out)
}

/// Records a bad input: fatal with `strict`, else skipped and counted.
fn bad(strict: bool, report: &mut Report, kind: &str, message: String) -> Result<()> {
    if strict {
        return Err(Error::Data(format!("{message} (--strict)")));
    }
    report.skip(kind, message);
    Ok(())
}

fn invalid_utf8(file: &Path, line: usize, offset: usize) -> String {
    format!(
        "{}:{line}: invalid UTF-8 at byte offset {offset}",
        file.display()
    )
}

/// Reports invalid UTF-8 at `offset` of a whole-file buffer, with its line.
fn bad_utf8_in(
    file: &Path,
    bytes: &[u8],
    offset: usize,
    strict: bool,
    report: &mut Report,
) -> Result<()> {
    let line = 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count();
    bad(
        strict,
        report,
        "invalid UTF-8",
        invalid_utf8(file, line, offset),
    )
}

/// A `.json` file holding one array of objects, or JSON Lines (one object per line).
fn read_json(
    file: &Arc<PathBuf>,
    bytes: &[u8],
    strict: bool,
    report: &mut Report,
) -> Result<Vec<RawRecord>> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                bad_utf8_in(file, bytes, e.valid_up_to(), strict, report)?;
                return Ok(vec![]);
            }
        };
        let items: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            Error::bad_file(
                file.as_path(),
                format!("line {}: malformed JSON array: {e}", e.line()),
            )
        })?;
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.into_iter().enumerate() {
            match v {
                Value::Object(m) => out.push(RawRecord {
                    file: file.clone(),
                    line: i + 1,
                    value: RawValue::Object(m),
                }),
                other => bad(
                    strict,
                    report,
                    "record is not a JSON object",
                    format!(
                        "{}: element {}: expected a JSON object, found {}",
                        file.display(),
                        i + 1,
                        json_kind(&other)
                    ),
                )?,
            }
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    let mut offset = 0usize;
    for (i, raw_line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let start = offset;
        offset += raw_line.len() + 1;
        let trimmed = raw_line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        let text = match std::str::from_utf8(trimmed) {
            Ok(t) => t,
            Err(e) => {
                let lead = raw_line.len() - raw_line.trim_ascii_start().len();
                bad(
                    strict,
                    report,
                    "invalid UTF-8",
                    invalid_utf8(file, line_no, start + lead + e.valid_up_to()),
                )?;
                continue;
            }
        };
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => out.push(RawRecord {
                file: file.clone(),
                line: line_no,
                value: RawValue::Object(m),
            }),
            Ok(other) => bad(
                strict,
                report,
                "record is not a JSON object",
                format!(
                    "{}:{line_no}: expected a JSON object, found {}",
                    file.display(),
                    json_kind(&other)
                ),
            )?,
            Err(e) => bad(
                strict,
                report,
                "malformed JSON",
                format!("{}:{line_no}: malformed JSON: {e}", file.display()),
            )?,
        }
    }
    Ok(out)
}

/// "a string", "an array", …: a JSON value's kind for error messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// CSV/TSV with a header row; every row becomes an object of strings.
fn read_csv(
    file: &Arc<PathBuf>,
    bytes: &[u8],
    delim: u8,
    strict: bool,
    report: &mut Report,
) -> Result<Vec<RawRecord>> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delim)
        .flexible(true)
        .from_reader(bytes);
    let headers: Vec<String> = match rdr.byte_headers() {
        Ok(h) => h
            .iter()
            .enumerate()
            .map(|(i, f)| {
                std::str::from_utf8(f)
                    .map(|s| s.trim_start_matches('\u{feff}').to_string())
                    .map_err(|e| {
                        Error::bad_file(
                            file.as_path(),
                            format!(
                                "header field {}: invalid UTF-8 at byte offset {}",
                                i + 1,
                                e.valid_up_to()
                            ),
                        )
                    })
            })
            .collect::<Result<_>>()?,
        Err(e) => {
            return Err(Error::bad_file(
                file.as_path(),
                format!("cannot read the CSV header: {e}"),
            ))
        }
    };
    if headers.is_empty() {
        return Err(Error::bad_file(
            file.as_path(),
            "the CSV file has no header row",
        ));
    }
    let mut out = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                bad(
                    strict,
                    report,
                    "unreadable CSV row",
                    format!("{}:{line}: {e}", file.display()),
                )?;
                continue;
            }
        }
        let pos = record.position().cloned();
        let line = pos.as_ref().map_or(0, |p| p.line() as usize);
        if record.len() != headers.len() {
            bad(
                strict,
                report,
                "ragged CSV row",
                format!(
                    "{}:{line}: row has {} fields, the header has {}",
                    file.display(),
                    record.len(),
                    headers.len()
                ),
            )?;
            continue;
        }
        let mut map = Map::new();
        let mut ok = true;
        for (i, (h, f)) in headers.iter().zip(record.iter()).enumerate() {
            match std::str::from_utf8(f) {
                Ok(s) => {
                    map.insert(h.clone(), Value::String(s.to_string()));
                }
                Err(e) => {
                    let field_start = pos.as_ref().map_or(0, |p| p.byte() as usize)
                        + record.range(i).map_or(0, |r| r.start);
                    bad(
                        strict,
                        report,
                        "invalid UTF-8",
                        invalid_utf8(file, line, field_start + e.valid_up_to()),
                    )?;
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            out.push(RawRecord {
                file: file.clone(),
                line,
                value: RawValue::Object(map),
            });
        }
    }
    Ok(out)
}

/// A whole text file is one record.
fn read_text(
    file: &Arc<PathBuf>,
    bytes: Vec<u8>,
    strict: bool,
    report: &mut Report,
) -> Result<Vec<RawRecord>> {
    match String::from_utf8(bytes) {
        Ok(text) => Ok(vec![RawRecord {
            file: file.clone(),
            line: 0,
            value: RawValue::Text(text),
        }]),
        Err(e) => {
            bad_utf8_in(
                file,
                e.as_bytes(),
                e.utf8_error().valid_up_to(),
                strict,
                report,
            )?;
            Ok(vec![])
        }
    }
}

/// Parquet rows through the record API (any column types; nested lists and structs become JSON).
fn read_parquet(file: &Arc<PathBuf>, strict: bool, report: &mut Report) -> Result<Vec<RawRecord>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(file.as_path()).map_err(|e| Error::io(file.as_path(), e))?;
    let reader = SerializedFileReader::new(f).map_err(|e| {
        Error::bad_file(file.as_path(), format!("not a readable Parquet file: {e}"))
    })?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| Error::bad_file(file.as_path(), format!("cannot read Parquet rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        match row {
            Ok(row) => match row.to_json_value() {
                Value::Object(m) => out.push(RawRecord {
                    file: file.clone(),
                    line: i + 1,
                    value: RawValue::Object(m),
                }),
                _ => bad(
                    strict,
                    report,
                    "unreadable Parquet row",
                    format!("{}: row {}: not a record", file.display(), i + 1),
                )?,
            },
            Err(e) => bad(
                strict,
                report,
                "unreadable Parquet row",
                format!("{}: row {}: {e}", file.display(), i + 1),
            )?,
        }
    }
    Ok(out)
}
