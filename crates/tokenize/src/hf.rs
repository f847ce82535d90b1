//! Hugging Face tokenizers: `tokenizer.json` through the `tokenizers` crate (pure-Rust
//! regex backend) and the chat template of `tokenizer_config.json` rendered with
//! minijinja set up the way transformers sets up jinja2 — `trim_blocks`, `lstrip_blocks`,
//! loop controls, a `tojson` that writes like Python's `json.dumps(ensure_ascii=False)`,
//! `raise_exception`, `strftime_now`, and Python string/dict methods (`pycompat`).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Environment, Error, ErrorKind, Value as JValue};
use serde_json::Value;

use crate::{TokenizeError, Tokenizer};

pub struct HfTokenizer {
    tok: tokenizers::Tokenizer,
    /// Reuses the tokens of seen prompt prefixes (None when the tokenizer appends
    /// special tokens at the end, e.g. BERT's [SEP], which would break reuse).
    store: Option<crate::prefix::PrefixStore>,
    env: Environment<'static>,
    has_template: bool,
    bos: String,
    eos: String,
    vocab: u32,
}

/// `json.dumps` separators: `", "` and `": "` (or `","` with an indent, like Python).
struct PyFormatter {
    indent: Option<usize>,
    level: usize,
    has_value: bool,
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(if self.indent.is_some() { b"," } else { b", " })?;
        }
        self.newline(w)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

impl PyFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(n) = self.indent {
            w.write_all(b"\n")?;
            for _ in 0..n * self.level {
                w.write_all(b" ")?;
            }
        }
        Ok(())
    }
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent)`.
pub fn py_json_dumps(v: &Value, indent: Option<usize>) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter { indent, level: 0, has_value: false });
    let _ = serde::Serialize::serialize(v, &mut ser);
    String::from_utf8(out).unwrap_or_default()
}

fn tojson(v: JValue, kwargs: minijinja::value::Kwargs) -> Result<JValue, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&v).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JValue::from_safe_string(py_json_dumps(&json, indent)))
}

/// `strftime_now(format)` for the common directives, in UTC.
fn strftime_now(fmt: String) -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn token_str(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl HfTokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let file = dir.join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| TokenizeError::Load(format!("{}: {e}", file.display())))?;
        let cfg: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TokenizeError::Load(format!("{}: {e}", dir.join("tokenizer_config.json").display())))?,
            Err(_) => Value::Null,
        };
        let template = match cfg.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", |msg: String| -> Result<JValue, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", strftime_now);
        let has_template = template.is_some();
        if let Some(t) = template {
            env.add_template_owned("chat", t).map_err(|e| TokenizeError::Template(e.to_string()))?;
        }
        let vocab = tok.get_vocab_size(true) as u32;
        // Reuse is safe when special tokens are only ever added in front.
        let ids = |special| tok.encode("kv cache router", special).map(|e| e.get_ids().to_vec()).unwrap_or_default();
        let (with, without) = (ids(true), ids(false));
        let store = with.ends_with(&without).then(crate::prefix::PrefixStore::default);
        Ok(Self {
            tok,
            store,
            env,
            has_template,
            bos: token_str(cfg.get("bos_token")),
            eos: token_str(cfg.get("eos_token")),
            vocab,
        })
    }
}

impl HfTokenizer {
    /// Prompts tokenized by reusing a stored prefix (see [`crate::prefix`]).
    pub fn prefix_reuses(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.reused())
    }

    /// Plain tokenization, bypassing the prefix store (tests compare against it).
    pub fn tokenizer_only(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        self.tok.encode(text, add_special_tokens).map(|e| e.get_ids().to_vec()).unwrap_or_default()
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        let run = |t: &str, special: bool| -> crate::prefix::Tokenized {
            match self.tok.encode(t, special) {
                Ok(e) => crate::prefix::Tokenized {
                    ids: e.get_ids().to_vec(),
                    starts: e.get_offsets().iter().map(|o| o.0).collect(),
                },
                Err(_) => crate::prefix::Tokenized { ids: Vec::new(), starts: Vec::new() },
            }
        };
        match &self.store {
            Some(store) if text.len() >= 2 * crate::prefix::CHUNK => {
                let out =
                    store.encode(add_special_tokens as u64, text, |t| run(t, add_special_tokens), |t| run(t, false));
                out.ids.clone()
            }
            _ => run(text, add_special_tokens).ids,
        }
    }

    fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        if !self.has_template {
            return Err(TokenizeError::Template("this tokenizer has no chat template".into()));
        }
        let tpl = self.env.get_template("chat").map_err(|e| TokenizeError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => JValue::from_serialize(messages),
            tools => tools.map(JValue::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        };
        tpl.render(ctx).map_err(|e| TokenizeError::Template(format!("{e:#}")))
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, true).unwrap_or_default()
    }

    fn output_token(&self, n: u64) -> u32 {
        // Plain vocabulary ids (well below the special tokens at the end of most vocabs).
        (1000 + n.wrapping_mul(2_654_435_761) % (self.vocab.max(2000) as u64 / 2)) as u32
    }
}
