//! Pod entries: which pod holds a block, on which tier, whether only speculatively.

/// A pod (one vLLM engine endpoint; one per data-parallel rank), interned.
pub type PodId = u16;

/// A cache tier (`gpu`, `cpu`, …), interned; see [`crate::Tiers`].
pub type TierId = u8;

/// Most pods an index tracks.
pub const MAX_PODS: usize = 1 << 16;
/// Most tiers an index tracks.
pub const MAX_TIERS: usize = 16;

/// `(pod, tier, epoch, speculative)` packed into 4 bytes: bits 0–15 pod, 16–19 tier,
/// 20–27 the pod's clear-epoch when written, bit 28 speculative.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PodEntry(u32);

impl PodEntry {
    pub(crate) fn new(pod: PodId, tier: TierId, epoch: u8, speculative: bool) -> Self {
        Self(pod as u32 | ((tier as u32 & 0xf) << 16) | ((epoch as u32) << 20) | ((speculative as u32) << 28))
    }
    /// An entry as another backend reports it (no epoch).
    pub fn of(pod: PodId, tier: TierId, speculative: bool) -> Self {
        Self::new(pod, tier, 0, speculative)
    }
    pub fn pod(self) -> PodId {
        self.0 as u16
    }
    pub fn tier(self) -> TierId {
        ((self.0 >> 16) & 0xf) as u8
    }
    pub(crate) fn epoch(self) -> u8 {
        (self.0 >> 20) as u8
    }
    pub fn speculative(self) -> bool {
        self.0 & (1 << 28) != 0
    }
    pub(crate) fn confirmed(self) -> Self {
        Self(self.0 & !(1 << 28))
    }
    pub(crate) fn same_holder(self, pod: PodId, tier: TierId) -> bool {
        self.pod() == pod && self.tier() == tier
    }
}

impl std::fmt::Debug for PodEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pod{}/t{}{}", self.pod(), self.tier(), if self.speculative() { "?" } else { "" })
    }
}
