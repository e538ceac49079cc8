//! flip-transfer
