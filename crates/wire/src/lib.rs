//! flip-wire
