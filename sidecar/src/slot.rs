//! Redis Cluster hash slots: CRC16 (XMODEM) of the key, or of the first non-empty
//! `{...}` hash tag, modulo 16384.

pub const SLOTS: u16 = 16384;

/// `TABLES[k][i]` is the CRC of byte `i` followed by `k` zero bytes:
/// `i·x^(16 + 8k) mod P`. Row 0 is the usual byte-at-a-time table; rows 1-3
/// let [`crc16`] fold four bytes per step with four independent lookups
/// ("slicing by 4") instead of a chain of four dependent ones.
const fn crc16_tables() -> [[u16; 256]; 4] {
    let mut t = [[0u16; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut j = 0;
        while j < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            j += 1;
        }
        t[0][i] = crc;
        i += 1;
    }
    let mut k = 1;
    while k < 4 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev << 8) ^ t[0][(prev >> 8) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static TABLES: [[u16; 256]; 4] = crc16_tables();

/// CRC16-XMODEM, as Redis Cluster hashes keys.
pub fn crc16(data: &[u8]) -> u16 {
    let [t0, t1, t2, t3] = &TABLES;
    let mut chunks = data.chunks_exact(4);
    let mut crc = chunks.by_ref().fold(0u16, |crc, c| {
        let head = crc ^ u16::from_be_bytes([c[0], c[1]]);
        t3[usize::from(head >> 8)]
            ^ t2[usize::from(head & 0xff)]
            ^ t1[usize::from(c[2])]
            ^ t0[usize::from(c[3])]
    });
    for &b in chunks.remainder() {
        crc = (crc << 8) ^ t0[usize::from(((crc >> 8) as u8) ^ b)];
    }
    crc
}

/// The part of the key that is hashed: the first `{...}` with a non-empty
/// body, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

pub fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_redis_cluster_spec_vector() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    /// The definition: one bit at a time, most significant first.
    fn crc16_bitwise(data: &[u8]) -> u16 {
        let mut crc = 0u16;
        for &b in data {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    proptest::proptest! {
        #[test]
        fn four_bytes_at_a_time_is_the_crc_of_the_definition(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            proptest::prop_assert_eq!(crc16(&data), crc16_bitwise(&data));
        }
    }

    #[test]
    fn known_keys_land_in_the_slots_redis_reports() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn hash_tags_put_related_keys_in_one_slot() {
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
    }
}
