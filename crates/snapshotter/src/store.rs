//! The crash-safe, transactional snapshot metadata store (redb), keyed by namespace and key.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// (namespace, key) -> JSON-encoded [`Record`].
const SNAPSHOTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("snapshots");
/// Counters; `next_id` numbers the snapshot directories.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_ID: &str = "next_id";

/// The kind of a snapshot, as containerd's `snapshots.Kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The name used by containerd's filters (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot, as containerd's `snapshots.Usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// What the store keeps for one snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Names the directory `ROOT/snapshots/<id>`; never reused.
    pub id: u64,
    pub kind: Kind,
    /// Key of the parent in the same namespace, empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured once at commit time, as containerd does for committed layers.
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// The metadata database.
pub struct Store {
    db: Database,
}

fn decode(bytes: &[u8]) -> Result<Record> {
    Ok(serde_json::from_slice(bytes)?)
}

impl Store {
    /// Opens (or creates) the database file; redb recovers an interrupted
    /// transaction on open, so a crash leaves the last committed state.
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(SNAPSHOTS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        Ok(Store { db })
    }

    /// The record of `key` in `ns`, if any.
    pub fn get(&self, ns: &str, key: &str) -> Result<Option<Record>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        match t.get((ns, key))? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Like [`Store::get`] but NotFound when absent.
    pub fn require(&self, ns: &str, key: &str) -> Result<Record> {
        self.get(ns, key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }

    /// Creates an active or view snapshot. `place` runs inside the write
    /// transaction with the new id, before the commit: it moves the prepared
    /// directory into place, so a crash leaves at worst a directory without
    /// metadata (removed by cleanup), never metadata without a directory.
    pub fn create(
        &self,
        ns: &str,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: HashMap<String, String>,
        place: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Record> {
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "only active and view snapshots can be created".into(),
            ));
        }
        if key.is_empty() {
            return Err(Error::InvalidArgument("empty snapshot key".into()));
        }
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            if t.get((ns, key))?.is_some() {
                return Err(Error::AlreadyExists(key.to_string()));
            }
            if !parent.is_empty() {
                let p = match t.get((ns, parent))? {
                    Some(v) => decode(v.value())?,
                    None => {
                        return Err(Error::NotFound(format!("parent {parent}")));
                    }
                };
                if p.kind != Kind::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
            }
            let mut m = tx.open_table(META)?;
            let id = m.get(NEXT_ID)?.map(|v| v.value()).unwrap_or(0) + 1;
            m.insert(NEXT_ID, id)?;
            let now = SystemTime::now();
            let rec = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                usage: None,
            };
            t.insert((ns, key), serde_json::to_vec(&rec)?.as_slice())?;
            rec
        };
        place(rec.id)?;
        tx.commit()?;
        Ok(rec)
    }

    /// Turns active `key` into committed `name` (same id and directory).
    pub fn commit(
        &self,
        ns: &str,
        key: &str,
        name: &str,
        labels: HashMap<String, String>,
        usage: Option<Usage>,
    ) -> Result<Record> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("empty snapshot name".into()));
        }
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let old = match t.get((ns, key))? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(key.to_string())),
            };
            if old.kind != Kind::Active {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if t.get((ns, name))?.is_some() {
                return Err(Error::AlreadyExists(name.to_string()));
            }
            let now = SystemTime::now();
            let rec = Record {
                id: old.id,
                kind: Kind::Committed,
                parent: old.parent,
                labels,
                created: now,
                updated: now,
                usage,
            };
            t.remove((ns, key))?;
            t.insert((ns, name), serde_json::to_vec(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Fails with FailedPrecondition when `key` has children.
    fn check_no_children(
        t: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
        ns: &str,
        key: &str,
    ) -> Result<()> {
        for entry in t.range((ns, "")..)? {
            let (k, v) = entry?;
            let (kns, child) = k.value();
            if kns != ns {
                break;
            }
            if decode(v.value())?.parent == key {
                return Err(Error::FailedPrecondition(format!(
                    "cannot remove snapshot {key:?}: it has child {child:?}"
                )));
            }
        }
        Ok(())
    }

    /// Deletes `key`'s metadata; refuses while it has children. Runs `release` on the record once the children check
    /// passed and before the deletion commits, all in one write transaction: no child
    /// can be created in between, and a failing `release` keeps the record.
    pub fn remove_with(
        &self,
        ns: &str,
        key: &str,
        release: impl FnOnce(&Record) -> Result<()>,
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let rec = match t.get((ns, key))? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(key.to_string())),
            };
            Self::check_no_children(&t, ns, key)?;
            release(&rec)?;
            t.remove((ns, key))?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Applies `f` to the record of `key` and stores the result.
    pub fn update(
        &self,
        ns: &str,
        key: &str,
        f: impl FnOnce(&mut Record) -> Result<()>,
    ) -> Result<Record> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(SNAPSHOTS)?;
            let mut rec = match t.get((ns, key))? {
                Some(v) => decode(v.value())?,
                None => return Err(Error::NotFound(key.to_string())),
            };
            f(&mut rec)?;
            rec.updated = SystemTime::now();
            t.insert((ns, key), serde_json::to_vec(&rec)?.as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// All snapshots of `ns`, ordered by key.
    pub fn list(&self, ns: &str) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in t.range((ns, "")..)? {
            let (k, v) = entry?;
            let (kns, key) = k.value();
            if kns != ns {
                break;
            }
            out.push((key.to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    /// Every snapshot of every namespace as (namespace, key, record).
    pub fn all(&self) -> Result<Vec<(String, String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            let (ns, key) = k.value();
            out.push((ns.to_string(), key.to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    /// The ancestors of a snapshot whose parent is `parent`, nearest first.
    pub fn ancestors(&self, ns: &str, parent: &str) -> Result<Vec<(String, Record)>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SNAPSHOTS)?;
        let mut out: Vec<(String, Record)> = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            if out.len() > 4096 {
                return Err(Error::Store(format!(
                    "parent chain of {parent:?} too long or cyclic"
                )));
            }
            let rec = match t.get((ns, next.as_str()))? {
                Some(v) => decode(v.value())?,
                None => {
                    return Err(Error::Store(format!(
                        "parent {next:?} missing from the store"
                    )))
                }
            };
            let following = rec.parent.clone();
            out.push((next, rec));
            next = following;
        }
        Ok(out)
    }
}
