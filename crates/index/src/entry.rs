//! Pod entries: which pod holds a block, on which tier, whether only speculatively.

/// A pod (one vLLM engine endpoint; one per data-parallel rank), interned.
pub type PodId = u16;

/// A cache tier (`gpu`, `cpu`, …), interned; see [`crate::Tiers`].
pub type TierId = u8;

/// Most pods an index tracks.
pub const MAX_PODS: usize = 1 << 16;
/// Most tiers an index tracks.
pub const MAX_TIERS: usize = 16;

/// Copies counted inside an entry; beyond it, the rest is kept beside the entry.
pub(crate) const INLINE_COPIES: u32 = 7;

/// `(pod, tier, epoch, speculative, copies)` packed into 4 bytes: bits 0–15 pod, 16–19
/// tier, 20–27 the pod's clear-epoch when written, bit 28 speculative, 29–31 how many
/// copies of the block the pod holds on that tier (vLLM does not de-duplicate cached
/// blocks: the same block can be stored twice and removed once; 0 for a speculative
/// entry, `INLINE_COPIES` meaning "that many or more", the rest counted elsewhere).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PodEntry(u32);

impl PodEntry {
    pub(crate) fn new(pod: PodId, tier: TierId, epoch: u8, speculative: bool) -> Self {
        let copies = if speculative { 0 } else { 1 };
        Self(
            pod as u32
                | ((tier as u32 & 0xf) << 16)
                | ((epoch as u32) << 20)
                | ((speculative as u32) << 28)
                | (copies << 29),
        )
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
    /// Copies of the block this entry counts (0 for a speculative entry; saturates at
    /// `INLINE_COPIES`, the in-memory index keeps the rest beside it).
    pub fn copies(self) -> u32 {
        self.0 >> 29
    }
    pub(crate) fn with_copies(self, n: u32) -> Self {
        Self((self.0 & !(7 << 29)) | (n.min(INLINE_COPIES) << 29))
    }
    /// A confirmed entry holding one copy.
    pub(crate) fn confirmed(self) -> Self {
        Self(self.0 & !(1 << 28)).with_copies(1)
    }
    pub(crate) fn same_holder(self, pod: PodId, tier: TierId) -> bool {
        self.pod() == pod && self.tier() == tier
    }
}

impl std::fmt::Debug for PodEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pod{}/t{}{}", self.pod(), self.tier(), if self.speculative() { "?" } else { "" })?;
        if self.copies() > 1 {
            write!(f, "×{}", self.copies())?;
        }
        Ok(())
    }
}
