//! flip-transport
