//! Where chunks live in packs, for tests that damage or inspect them.
#![allow(dead_code)] // each test binary uses a different part

use imgbuild::snapshot::pack::{Index, Location};
use imgbuild::snapshot::{Keys, Store};

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
