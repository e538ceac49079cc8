//! flip-scan
