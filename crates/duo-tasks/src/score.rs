//! Scores for generated answers.
//!
//! Needle in a haystack (ALGORITHM.md §6): the fraction of the needle's words found in
//! the answer. Passkeys: the fraction of the expected words produced at their position.
//! Both compare lower-cased words with punctuation stripped, so "Park." matches "park".

/// Lower-cased words with leading and trailing punctuation removed.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Fraction of the distinct words of `needle` that appear anywhere in `answer`.
pub fn needle_recall(needle: &str, answer: &str) -> f64 {
    let mut expected = words(needle);
    expected.sort();
    expected.dedup();
    if expected.is_empty() {
        return 0.0;
    }
    let got: std::collections::HashSet<String> = words(answer).into_iter().collect();
    expected.iter().filter(|w| got.contains(*w)).count() as f64 / expected.len() as f64
}

/// Fraction of `expected` words that `generated` reproduces at the same position
/// (word `i` of the generation against word `i` of the expectation).
pub fn passkey_match(expected: &[&str], generated: &str) -> f64 {
    if expected.is_empty() {
        return 0.0;
    }
    let got = words(generated);
    expected.iter().enumerate().filter(|(i, w)| got.get(*i).is_some_and(|g| g == &w.to_lowercase())).count() as f64
        / expected.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEEDLE: &str = "Remember, the best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";

    #[test]
    fn perfect_and_wrong_needle_answers() {
        assert_eq!(needle_recall(NEEDLE, NEEDLE), 1.0);
        assert_eq!(needle_recall(NEEDLE, "remember THE best thing to do in san francisco is: eat a sandwich, and sit in dolores park on a sunny day!"), 1.0);
        assert_eq!(needle_recall(NEEDLE, "Quantum chromodynamics."), 0.0);
        let partial = needle_recall(NEEDLE, "eat a sandwich");
        let distinct = {
            let mut w = words(NEEDLE);
            w.sort();
            w.dedup();
            w.len()
        };
        assert!((partial - 3.0 / distinct as f64).abs() < 1e-12);
    }

    #[test]
    fn perfect_and_wrong_passkeys() {
        let key = ["Alfa", "Bravo", "Charlie", "Delta"];
        assert_eq!(passkey_match(&key, " Alfa Bravo Charlie Delta\n\nmore text"), 1.0);
        assert_eq!(passkey_match(&key, "Zulu Zulu Zulu Zulu"), 0.0);
        assert_eq!(passkey_match(&key, "Alfa Charlie Charlie Delta"), 0.75);
        // A missing word shifts the rest: position matters.
        assert_eq!(passkey_match(&key, "Alfa Charlie Delta"), 0.25);
        assert_eq!(passkey_match(&key, ""), 0.0);
    }
}
