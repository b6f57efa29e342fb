//! The thin hardware layer (bare-metal target only).
