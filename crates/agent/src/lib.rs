//! flip-agent
