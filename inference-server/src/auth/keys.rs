//! The deployment's two keys, read from `primaryKey` and `secondaryKey` in a directory (a
//! mounted Secret). A background task re-reads them, so rotating a key in the Secret takes
//! effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use subtle::ConstantTimeEq;

const FILES: [&str; 2] = ["primaryKey", "secondaryKey"];

/// The current keys; cheap to clone.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
    keys: Arc<RwLock<Vec<Vec<u8>>>>,
}

/// Why the keys could not be read at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no usable key in {dir}: expected files primaryKey and/or secondaryKey with a key of at \
         least 16 characters each"
    )]
    NoKeys { dir: PathBuf },
}

impl KeyStore {
    /// Reads the keys once; at least one must be present.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let keys = read_keys(dir);
        if keys.is_empty() {
            return Err(KeyError::NoKeys {
                dir: dir.to_owned(),
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            keys: Arc::new(RwLock::new(keys)),
        })
    }

    /// A store holding `keys` (tests).
    pub fn fixed(keys: &[&str]) -> Self {
        Self {
            dir: PathBuf::new(),
            keys: Arc::new(RwLock::new(
                keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            )),
        }
    }

    /// Whether `presented` equals one of the keys, compared in constant time (every key is
    /// compared, whatever matches).
    pub fn matches(&self, presented: &str) -> bool {
        let Ok(keys) = self.keys.read() else {
            return false;
        };
        let mut found = subtle::Choice::from(0u8);
        for key in keys.iter() {
            // Lengths are public (keys have a fixed length); contents are not.
            if key.len() == presented.len() {
                found |= key.as_slice().ct_eq(presented.as_bytes());
            }
        }
        bool::from(found)
    }

    /// Re-reads the files every `period` until the runtime stops. A directory left without
    /// keys (a Secret being replaced) keeps the previous keys.
    pub fn watch(&self, period: Duration) {
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            loop {
                ticker.tick().await;
                let fresh = read_keys(&store.dir);
                if fresh.is_empty() {
                    continue;
                }
                let Ok(mut keys) = store.keys.write() else {
                    return;
                };
                if *keys != fresh {
                    *keys = fresh;
                    tracing::info!(dir = %store.dir.display(), "keys changed on disk; reloaded");
                }
            }
        });
    }
}

fn read_keys(dir: &Path) -> Vec<Vec<u8>> {
    FILES
        .iter()
        .filter_map(|name| std::fs::read_to_string(dir.join(name)).ok())
        .map(|text| text.trim().as_bytes().to_vec())
        .filter(|key| key.len() >= 16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_key_matches_and_nothing_else() {
        let store = KeyStore::fixed(&["a".repeat(32).as_str(), "b".repeat(32).as_str()]);
        assert!(store.matches(&"a".repeat(32)));
        assert!(store.matches(&"b".repeat(32)));
        assert!(!store.matches(&"c".repeat(32)));
        assert!(!store.matches(&"a".repeat(31)));
        assert!(!store.matches(""));
    }

    #[test]
    fn keys_are_read_from_files_trimmed() {
        let dir = std::env::temp_dir().join(format!("llama-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("primaryKey"), format!("{}\n", "p".repeat(32))).expect("write");
        let store = KeyStore::load(&dir).expect("keys");
        assert!(store.matches(&"p".repeat(32)));
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert!(KeyStore::load(&dir).is_err());
    }
}
