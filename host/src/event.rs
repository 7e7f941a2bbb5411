//! Events as the host sees them, and the seeds derived from their identity.

use sha2::{Digest, Sha256};

/// A record header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// Where an event sits in its source: its identity, the same in every run
/// and every module version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
}

impl Position {
    /// The pseudo-position of a processor's `init`, which runs before any event.
    pub fn init() -> Self {
        Position {
            stream: String::new(),
            partition: -1,
            offset: -1,
        }
    }

    /// The seed of this event's randomness: every random stream a guest
    /// sees while handling it derives from this, so every version of a
    /// processor sees the same streams for the same event.
    pub fn seed(&self) -> Seed {
        let mut hasher = Sha256::new();
        hasher.update(b"rewind-seed-v1\0");
        hasher.update((self.stream.len() as u64).to_be_bytes());
        hasher.update(self.stream.as_bytes());
        hasher.update(self.partition.to_be_bytes());
        hasher.update(self.offset.to_be_bytes());
        Seed(hasher.finalize().into())
    }
}

/// What a guest's randomness for one event starts from: the seed and the
/// first bytes of its WASI `random` stream. A source's reading thread works
/// it out ([`crate::source::Record::prepare`]), so that the thread running
/// the guest only copies it: the hash and the first ChaCha20 block were 2-3%
/// of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entropy {
    pub seed: Seed,
    /// The first [`Entropy::PREFIX`] bytes of `seed.rng(Seed::WASI)`.
    pub wasi_prefix: [u8; Entropy::PREFIX],
}

impl Entropy {
    /// Bytes of the WASI stream worked out ahead: what a processor drawing a
    /// few ids per event uses (one ChaCha20 block).
    pub const PREFIX: usize = 64;

    /// `init`'s, the same for every call: worked out once.
    pub fn init() -> &'static Entropy {
        static INIT: std::sync::LazyLock<Entropy> =
            std::sync::LazyLock::new(|| Entropy::of(&Position::init()));
        &INIT
    }

    pub fn of(position: &Position) -> Self {
        use rand_core::Rng;
        let seed = position.seed();
        let mut wasi_prefix = [0; Self::PREFIX];
        seed.rng(Seed::WASI).fill_bytes(&mut wasi_prefix);
        Entropy { seed, wasi_prefix }
    }

    /// The stream's first 16 bytes as the world's `event.random-prefix`
    /// has them: two little-endian words.
    pub fn random_prefix(&self) -> (u64, u64) {
        let word = |at: usize| {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&self.wasi_prefix[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        (word(0), word(8))
    }
}

/// An event's random seed; each consumer draws from its own ChaCha20 stream
/// of it ([`Seed::rng`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub [u8; 32]);

impl Seed {
    /// WASI `random`.
    pub const WASI: u64 = 1;
    /// WASI `insecure-random`.
    pub const WASI_INSECURE: u64 = 2;
    /// SQL `random()` and `randomblob()`.
    pub const SQL: u64 = 3;

    /// The generator for one consumer (`stream` is one of the constants).
    pub fn rng(&self, stream: u64) -> rand_chacha::ChaCha20Rng {
        use rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(self.0);
        rng.set_stream(stream);
        rng
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.stream, self.partition, self.offset)
    }
}

impl Position {
    /// The idempotency id of this input's output number `n`:
    /// `stream/partition@offset/n`. Built once per output, so without the
    /// formatting machinery `format!` would bring (most of an output's cost
    /// in the run loop).
    pub fn output_id(&self, n: usize) -> String {
        let mut number = itoa::Buffer::new();
        // The stream, three separators and the three numbers at their longest.
        let mut id = String::with_capacity(self.stream.len() + 3 + 11 + 20 + 20);
        id.push_str(&self.stream);
        id.push('/');
        id.push_str(number.format(self.partition));
        id.push('@');
        id.push_str(number.format(self.offset));
        id.push('/');
        id.push_str(number.format(n));
        id
    }
}

/// One input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub position: Position,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub timestamp_ms: Option<i64>,
}

/// An output event a processor emitted, with its place in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stream: String,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<Header>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_ids_are_the_position_and_the_index() {
        for (stream, partition, offset, n) in [
            ("orders.jsonl", 0, 1, 0),
            ("t", -1, i64::MIN, usize::MAX),
            ("", i32::MAX, i64::MAX, 7),
        ] {
            let position = Position {
                stream: stream.into(),
                partition,
                offset,
            };
            assert_eq!(position.output_id(n), format!("{position}/{n}"));
        }
    }

    #[test]
    fn seeds_differ_by_identity_and_streams_by_consumer() {
        use rand_core::Rng;
        let a = Position {
            stream: "orders".into(),
            partition: 0,
            offset: 1,
        };
        let b = Position {
            offset: 2,
            ..a.clone()
        };
        assert_eq!(a.seed(), a.clone().seed());
        assert_ne!(a.seed(), b.seed());
        // The stream length is hashed, so stream/offset bytes cannot alias.
        let c = Position {
            stream: "orders\0".into(),
            partition: 0,
            offset: 1,
        };
        assert_ne!(a.seed(), c.seed());
        let seed = a.seed();
        assert_ne!(
            seed.rng(Seed::WASI).next_u64(),
            seed.rng(Seed::SQL).next_u64()
        );
        assert_eq!(
            seed.rng(Seed::SQL).next_u64(),
            seed.rng(Seed::SQL).next_u64()
        );
    }
}
