//! The table of contents (TOC): its JSON types, with the reference's field names, and a
//! serializer that lays the JSON out the way the reference does.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Result;

/// Name of the tar entry that holds the TOC JSON in gzip-based blobs.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Entry that ends the prioritized files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Entry placed first when no file is prioritized.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The single byte a landmark file holds.
pub const LANDMARK_CONTENTS: u8 = 0x0f;

/// The kind of a TOC entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Dir,
    Reg,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    Chunk,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Dir => "dir",
            EntryType::Reg => "reg",
            EntryType::Symlink => "symlink",
            EntryType::Hardlink => "hardlink",
            EntryType::Char => "char",
            EntryType::Block => "block",
            EntryType::Fifo => "fifo",
            EntryType::Chunk => "chunk",
        }
    }
}

/// The TOC: format version and entries in blob order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero32(v: &u32) -> bool {
    *v == 0
}

/// One TOC entry. Field names and omission rules follow the reference, so a TOC we
/// write parses there and theirs parses here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, rename = "modtime", skip_serializing_if = "String::is_empty")]
    pub mod_time: String,
    #[serde(default, rename = "linkName", skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u64,
    #[serde(default, rename = "userName", skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(
        default,
        rename = "groupName",
        skip_serializing_if = "String::is_empty"
    )]
    pub group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(default, rename = "devMajor", skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    #[serde(default, rename = "devMinor", skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        serialize_with = "ser_xattrs",
        deserialize_with = "de_xattrs"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default, rename = "chunkOffset", skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    #[serde(default, rename = "chunkSize", skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(
        default,
        rename = "chunkDigest",
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    /// Offset of this chunk's bytes inside the decompressed member at `offset`; set only
    /// when several small files share one member (minimum chunk size).
    #[serde(default, rename = "innerOffset", skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
}

impl TocEntry {
    /// An entry of the given name and type with every other field empty.
    pub fn new(name: impl Into<String>, kind: EntryType) -> Self {
        TocEntry {
            name: name.into(),
            kind,
            size: 0,
            mod_time: String::new(),
            link_name: String::new(),
            mode: 0,
            uid: 0,
            gid: 0,
            user_name: String::new(),
            group_name: String::new(),
            offset: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            digest: String::new(),
            chunk_offset: 0,
            chunk_size: 0,
            chunk_digest: String::new(),
            inner_offset: 0,
        }
    }
}

fn ser_xattrs<S: Serializer>(
    map: &BTreeMap<String, Vec<u8>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(map.len()))?;
    for (k, v) in map {
        m.serialize_entry(k, &base64::engine::general_purpose::STANDARD.encode(v))?;
    }
    m.end()
}

fn de_xattrs<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<String, Vec<u8>>, D::Error> {
    let raw: Option<BTreeMap<String, String>> = Option::deserialize(d)?;
    let mut out = BTreeMap::new();
    for (k, v) in raw.unwrap_or_default() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("xattr {k:?}: bad base64: {e}")))?;
        out.insert(k, bytes);
    }
    Ok(out)
}

impl Toc {
    /// Parses TOC JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Toc> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// Parses TOC JSON, refusing it as soon as it holds more than `max_entries`
    /// entries, before they are all in memory.
    pub fn from_json_limited(bytes: &[u8], max_entries: usize) -> Result<Toc> {
        use serde::de::DeserializeSeed as _;
        let over = std::cell::Cell::new(false);
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let parsed = TocSeed {
            max_entries,
            over: &over,
        }
        .deserialize(&mut de)
        .and_then(|toc| de.end().map(|()| toc));
        match parsed {
            Ok(toc) => Ok(toc),
            Err(_) if over.get() => Err(crate::error::Error::TocBudget {
                what: "entries".into(),
                limit: max_entries as u64,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Where the prioritized files end in the blob, the value of the `prefetch-end`
    /// annotation: the first chunk after the prefetch landmark's member starts there
    /// (or the TOC, at `payload_end`), so a reader that fetches `0..end` has every
    /// byte of every prioritized chunk. `None` without prioritized files.
    pub fn prefetch_end_hint(&self, payload_end: u64) -> Option<u64> {
        let landmark = self
            .entries
            .iter()
            .find(|e| {
                e.kind == EntryType::Reg
                    && crate::names::clean_name(&e.name).is_ok_and(|n| n == PREFETCH_LANDMARK)
            })
            .map(|e| e.offset)
            .filter(|&o| o > 0)?;
        let next = self
            .entries
            .iter()
            .filter(|e| match e.kind {
                EntryType::Chunk => true,
                EntryType::Reg => {
                    e.size > 0
                        && !crate::names::clean_name(&e.name)
                            .is_ok_and(|n| n == PREFETCH_LANDMARK || n == NO_PREFETCH_LANDMARK)
                }
                _ => false,
            })
            .map(|e| e.offset)
            .filter(|&o| o > landmark)
            .min();
        Some(next.unwrap_or(payload_end).min(payload_end))
    }

    /// Serializes the TOC as the reference does: tab-indented, `<`, `>` and `&` escaped.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(128 * self.entries.len() + 64);
        let mut ser = serde_json::Serializer::with_formatter(&mut out, GoStyleFormatter::new());
        self.serialize(&mut ser)?;
        Ok(out)
    }
}

/// Deserializes a TOC object, counting entries as they arrive.
struct TocSeed<'a> {
    max_entries: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed<'_> {
    type Value = Toc;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Toc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed<'_> {
    type Value = Toc;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOC object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut m: A,
    ) -> std::result::Result<Toc, A::Error> {
        use serde::de::Error as _;
        let mut version = None;
        let mut entries = None;
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            match k.as_ref() {
                "version" => version = Some(m.next_value::<u32>()?),
                "entries" => {
                    // A repeated key replaces the earlier list: free it first.
                    drop(entries.take());
                    entries = Some(m.next_value_seed(EntriesSeed {
                        max_entries: self.max_entries,
                        over: self.over,
                    })?);
                }
                _ => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Toc {
            version: version.ok_or_else(|| A::Error::missing_field("version"))?,
            entries: entries.ok_or_else(|| A::Error::missing_field("entries"))?,
        })
    }
}

struct EntriesSeed<'a> {
    max_entries: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;
    fn deserialize<D: Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Vec<TocEntry>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of TOC entries")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Vec<TocEntry>, A::Error> {
        let mut out = Vec::new();
        while let Some(e) = seq.next_element::<TocEntry>()? {
            if out.len() >= self.max_entries {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many TOC entries"));
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// serde_json formatter producing the bytes of Go's `json.MarshalIndent(v, "", "\t")`.
struct GoStyleFormatter {
    inner: serde_json::ser::PrettyFormatter<'static>,
}

impl GoStyleFormatter {
    fn new() -> Self {
        GoStyleFormatter {
            inner: serde_json::ser::PrettyFormatter::with_indent(b"\t"),
        }
    }
}

macro_rules! delegate {
    ($($name:ident($($arg:ident : $ty:ty),*)),* $(,)?) => {
        $(fn $name<W: ?Sized + std::io::Write>(&mut self, w: &mut W $(, $arg: $ty)*) -> std::io::Result<()> {
            self.inner.$name(w $(, $arg)*)
        })*
    };
}

impl serde_json::ser::Formatter for GoStyleFormatter {
    delegate!(
        begin_array(),
        end_array(),
        begin_array_value(first: bool),
        end_array_value(),
        begin_object(),
        end_object(),
        begin_object_key(first: bool),
        begin_object_value(),
        end_object_value(),
    );

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let esc: Option<&[u8]> = match c {
                '<' => Some(b"\\u003c"),
                '>' => Some(b"\\u003e"),
                '&' => Some(b"\\u0026"),
                '\u{2028}' => Some(b"\\u2028"),
                '\u{2029}' => Some(b"\\u2029"),
                _ => None,
            };
            if let Some(esc) = esc {
                w.write_all(&fragment.as_bytes()[start..i])?;
                w.write_all(esc)?;
                start = i + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        use serde_json::ser::CharEscape::*;
        // Go writes \b and \f as \u escapes; everything else matches serde_json.
        match escape {
            Backspace => w.write_all(b"\\u0008"),
            FormFeed => w.write_all(b"\\u000c"),
            other => serde_json::ser::CompactFormatter.write_char_escape(w, other),
        }
    }
}

/// Formats seconds since the epoch as the reference's `modtime` (RFC 3339, UTC, whole
/// seconds); the epoch itself is left out, as the reference does.
pub fn format_modtime(secs: i64) -> String {
    if secs == 0 {
        return String::new();
    }
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        y,
        m,
        d,
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parses an RFC 3339 timestamp to seconds since the epoch (fractions dropped).
pub fn parse_modtime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset)
}

// Howard Hinnant's calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modtime_round_trips() {
        for secs in [1, 1_700_000_000, 951_782_400, 4_102_444_800, -86_400] {
            let s = format_modtime(secs);
            assert_eq!(parse_modtime(&s), Some(secs), "{s}");
        }
        assert_eq!(format_modtime(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_modtime(0), "");
        assert_eq!(
            parse_modtime("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_modtime("2023-11-14T22:13:20.999Z"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_modtime("not a time"), None);
        assert_eq!(parse_modtime("2023-13-14T22:13:20Z"), None);
    }

    #[test]
    fn json_matches_go_layout() {
        let mut e = TocEntry::new("a<b>&c", EntryType::Reg);
        e.size = 3;
        e.mode = 0o644;
        e.xattrs.insert("user.k".into(), b"v".to_vec());
        let toc = Toc {
            version: 1,
            entries: vec![e],
        };
        let json = String::from_utf8(toc.to_json().unwrap()).unwrap();
        assert_eq!(
            json,
            "{\n\t\"version\": 1,\n\t\"entries\": [\n\t\t{\n\t\t\t\"name\": \"a\\u003cb\\u003e\\u0026c\",\n\t\t\t\"type\": \"reg\",\n\t\t\t\"size\": 3,\n\t\t\t\"mode\": 420,\n\t\t\t\"xattrs\": {\n\t\t\t\t\"user.k\": \"dg==\"\n\t\t\t}\n\t\t}\n\t]\n}"
        );
        let back = Toc::from_json(json.as_bytes()).unwrap();
        assert_eq!(back, toc);
    }

    #[test]
    fn rejects_unknown_type_and_negative_sizes() {
        assert!(
            Toc::from_json(br#"{"version":1,"entries":[{"name":"a","type":"sock"}]}"#).is_err()
        );
        assert!(Toc::from_json(
            br#"{"version":1,"entries":[{"name":"a","type":"reg","size":-1}]}"#
        )
        .is_err());
    }
}
