//! The pooled pack buffers, alone in their own process (the pool is
//! process-wide): a save the cache refuses gives its buffer back.

mod common;

use erllama_cache::{pack_buffer, Cache, CacheConfig, SaveError, TierKind};

#[test]
fn a_refused_save_gives_its_pack_buffer_back() {
    let cache = Cache::open(CacheConfig::default()).expect("open");
    let tokens = common::toks(1, 10);
    cache
        .save(common::request(TierKind::Ram, &tokens, 1000))
        .expect("first save");
    for _ in 0..2 {
        let mut payload = pack_buffer(3 << 20);
        payload.extend_from_slice(&[7; 1000]);
        let ptr = payload.as_ptr();
        let mut request = common::request(TierKind::Ram, &tokens, 1000);
        request.payload = payload;
        assert!(matches!(
            cache.begin_save(request),
            Err(SaveError::AlreadyPresent(_))
        ));
        // The next pack of that size gets the very same buffer.
        let again = pack_buffer(3 << 20);
        assert_eq!(again.as_ptr(), ptr);
        drop(again);
    }
}
