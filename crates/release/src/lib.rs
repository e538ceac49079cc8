//! flip-release
