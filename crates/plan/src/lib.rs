//! flip-plan
