//! Python's `random.Random` (MT19937 seeded by `init_by_array`, `getrandbits`, `_randbelow`,
//! `sample`), so lm-eval's default few-shot sampler (`Random(1234).sample(docs, k)`) picks the
//! same examples here as there. Checked against CPython's own numbers in the tests.

const N: usize = 624;
const M: usize = 397;

pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        // CPython splits abs(seed) into 32-bit words, least significant first ([0] for 0).
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut r = Self {
            mt: [0; N],
            index: N,
        };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        let mut k = N.max(key.len());
        while k > 0 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
            k -= 1;
        }
        k = N - 1;
        while k > 0 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            k -= 1;
        }
        self.mt[0] = 0x8000_0000;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for kk in 0..N {
                let y = (self.mt[kk] & 0x8000_0000) | (self.mt[(kk + 1) % N] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.mt[kk] = self.mt[(kk + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for 1 <= k <= 64 (words least significant first, as CPython).
    fn getrandbits(&mut self, k: u32) -> u64 {
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let lo = u64::from(self.next_u32());
        let hi = u64::from(self.next_u32() >> (64 - k));
        lo | (hi << 32)
    }

    /// `_randbelow(n)`: uniform in [0, n), by rejection on `n.bit_length()` bits.
    pub fn randbelow(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        let bits = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(bits) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random()`: a double in [0, 1) from 53 random bits, as CPython's `random_random`.
    pub fn random(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// The indices `random.choices(range(n), k=k)` picks (with replacement).
    pub fn choices(&mut self, n: usize, k: usize) -> Vec<usize> {
        (0..k)
            .map(|_| ((self.random() * n as f64).floor() as usize).min(n.saturating_sub(1)))
            .collect()
    }

    /// The indices `random.sample(range(n), k)` picks, in its order (k <= n).
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let k = k.min(n);
        let mut setsize = 21usize;
        if k > 5 {
            // 4 ** ceil(log(k * 3, 4)), computed as CPython does (floating-point log).
            let e = ((k as f64 * 3.0).ln() / 4f64.ln()).ceil() as u32;
            setsize += 4usize.saturating_pow(e);
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow(n - i);
                out.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n);
                while selected.contains(&j) {
                    j = self.randbelow(n);
                }
                selected.insert(j);
                out.push(j);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11:
    /// `r = random.Random(1234); [r.getrandbits(32) for _ in range(3)]`,
    /// `random.Random(1234).sample(range(10), 5)`, `random.Random(1234).sample(range(1000), 6)`,
    /// and three successive `r.sample(range(50), 3)` on one `Random(42)`.
    #[test]
    fn matches_cpython() {
        let mut r = PyRandom::new(1234);
        let words: Vec<u64> = (0..3).map(|_| r.getrandbits(32)).collect();
        assert_eq!(words, EXPECTED_WORDS);
        assert_eq!(PyRandom::new(1234).sample(10, 5), EXPECTED_SAMPLE_10_5);
        assert_eq!(PyRandom::new(1234).sample(1000, 6), EXPECTED_SAMPLE_1000_6);
        let mut r = PyRandom::new(42);
        let seq: Vec<Vec<usize>> = (0..3).map(|_| r.sample(50, 3)).collect();
        let expected: Vec<Vec<usize>> = vec![vec![40, 7, 1], vec![47, 17, 15], vec![14, 8, 47]];
        assert_eq!(seq, expected);
        let mut r = PyRandom::new(7);
        assert_eq!(r.choices(10, 8), EXPECTED_CHOICES_7);
        assert_eq!(r.random(), EXPECTED_RANDOM_AFTER);
    }

    const EXPECTED_WORDS: [u64; 3] = [4150886329, 3342196574, 1892932127];
    const EXPECTED_SAMPLE_10_5: [usize; 5] = [7, 1, 0, 9, 4];
    const EXPECTED_SAMPLE_1000_6: [usize; 6] = [989, 796, 451, 119, 7, 92];
    const EXPECTED_CHOICES_7: [usize; 8] = [3, 1, 6, 0, 5, 3, 0, 5];
    const EXPECTED_RANDOM_AFTER: f64 = 0.03749565844198488;
}
