//! Snapshots of a host's volumes in S3: chunking, encryption, manifests, backup,
//! restore, retention. Owned by the snapshot work (issue 4).
