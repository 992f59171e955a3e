//! Where chunks live in packs, for tests that damage or inspect them.
#![allow(dead_code)] // each test binary uses a different part

use imgbuild::snapshot::format::{Entry, Manifest, Volume};
use imgbuild::snapshot::pack::{Index, Location};
use imgbuild::snapshot::{entries, Keys, Store};

/// A chunk's place: (object key, offset, sealed length); a format-1 object has
/// offset 0 and length 0.
pub async fn place(store: &Store, keys: &Keys, chunk_hex: &str) -> (String, u64, u64) {
    let ix = Index::load(store, keys).await.expect("index");
    let id: [u8; 32] = hex::decode(chunk_hex).unwrap().try_into().unwrap();
    match ix.locate(&id).expect("chunk has no place") {
        Location::Pack { pack, blob } => (
            ix.packs[pack].key.clone(),
            u64::from(blob.offset),
            u64::from(blob.sealed),
        ),
        Location::Object { key } => (key, 0, 0),
    }
}

/// Keys of every pack and index object.
pub async fn pack_and_index_keys(store: &Store, keys: &Keys) -> Vec<String> {
    let ix = Index::load(store, keys).await.expect("index");
    assert!(ix.problems.is_empty(), "{:?}", ix.problems);
    ix.packs
        .iter()
        .map(|p| p.key.clone())
        .chain(ix.objects.iter().cloned())
        .collect()
}

/// Number of objects under packs/.
pub async fn pack_count(store: &Store) -> usize {
    store
        .list(&imgbuild::snapshot::format::packs_dir(&store.prefix))
        .await
        .unwrap()
        .len()
}

/// A volume's entry list in order, as imgbuild reads it (inline or streamed).
pub async fn entry_list(store: &Store, keys: &Keys, v: &Volume) -> Vec<Entry> {
    let index = Index::load(store, keys).await.expect("index");
    let mut r = entries::EntryReader::new(store, keys, &index, v).unwrap();
    let mut out = Vec::new();
    while let Some(batch) = r.next_batch().await.unwrap() {
        out.extend(batch);
    }
    out
}

/// Turns a version-4 manifest's streamed entry lists into inline ones, as versions
/// 1-3 carried them (they know no `linked` marks); the caller sets the version.
pub async fn inline_entries(store: &Store, keys: &Keys, m: &mut Manifest) {
    for v in &mut m.volumes {
        let mut list = entry_list(store, keys, v).await;
        for e in &mut list {
            e.linked = false;
        }
        v.entries = list;
        v.meta.clear();
    }
    (m.stats.entry_bytes, m.stats.entry_bytes_new) = (0, 0);
}
