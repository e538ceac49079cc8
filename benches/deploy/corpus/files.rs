//! Generators for each kind of file: PHP classes, Twig, YAML, XLIFF, Markdown, changelogs,
//! Composer files, minified JS/CSS, images and SVG.

use super::*;
use std::fmt::Write as _;

pub(super) struct PhpFile<'a> {
    pub(super) vocab: &'a Vocab,
    pub(super) namespace: String,
    pub(super) class: String,
    pub(super) uses: Vec<String>,
    pub(super) header: &'a str,
}

/// The per-package license header (identical across the package's files, as in real code).
pub(super) fn license_header(vendor: &str, package: &str, author: &str) -> String {
    format!(
        "/*\n * This file is part of the {} {} package.\n *\n * (c) {} <{}@{}.example>\n *\n * For the full copyright and license information, please view the LICENSE\n * file that was distributed with this source code.\n */\n",
        pascal(&[vendor]),
        package,
        author,
        author.split(' ').next().unwrap_or("dev").to_lowercase(),
        vendor
    )
}

pub(super) fn php_class(rng: &mut Rng, f: &PhpFile, size: usize) -> String {
    let v = f.vocab;
    let mut s = String::with_capacity(size + 512);
    s.push_str("<?php\n\n");
    if !f.header.is_empty() {
        s.push_str(f.header);
        s.push('\n');
    }
    if rng.chance(0.4) {
        s.push_str("declare(strict_types=1);\n\n");
    }
    let _ = writeln!(s, "namespace {};\n", f.namespace);
    for u in &f.uses {
        let _ = writeln!(s, "use {u};");
    }
    if !f.uses.is_empty() {
        s.push('\n');
    }
    let _ = writeln!(s, "/**\n * {}.\n *", v.sentence(rng, 6, 16));
    if rng.chance(0.5) {
        let _ = writeln!(s, " * {}.\n *", v.sentence(rng, 8, 20));
    }
    let _ = writeln!(s, " * @author {}\n */", author_name(rng));
    let kind = if f.class.ends_with("Interface") {
        "interface"
    } else if f.class.ends_with("Trait") {
        "trait"
    } else if rng.chance(0.3) {
        "final class"
    } else if rng.chance(0.15) {
        "abstract class"
    } else {
        "class"
    };
    let _ = write!(s, "{kind} {}", f.class);
    if kind.ends_with("class") && rng.chance(0.35) {
        let _ = write!(s, " extends {}", v.class(rng));
    }
    if kind.ends_with("class") && rng.chance(0.45) {
        let _ = write!(s, " implements {}Interface", pascal(&v.words(rng, 1, 2)));
    }
    s.push_str("\n{\n");
    let props: Vec<String> = (0..rng.range(1, 6)).map(|_| v.var(rng)).collect();
    if kind != "interface" {
        for _ in 0..rng.range(0, 3) {
            let _ = writeln!(
                s,
                "    public const {} = '{}';",
                v.snake(rng).to_uppercase(),
                v.snake(rng)
            );
        }
        s.push('\n');
        for p in &props {
            let _ = writeln!(s, "    private {} ${p};", rng.pick(&TYPES));
        }
        s.push('\n');
        if rng.chance(0.6) {
            s.push_str("    public function __construct(");
            for (i, p) in props.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                let _ = write!(s, "{} ${p}", rng.pick(&TYPES));
            }
            s.push_str(")\n    {\n");
            for p in &props {
                let _ = writeln!(s, "        $this->{p} = ${p};");
            }
            s.push_str("    }\n");
        }
    }
    while s.len() < size {
        s.push('\n');
        php_method(rng, v, &props, kind == "interface", &mut s);
    }
    s.push_str("}\n");
    s
}

pub(super) fn php_method(
    rng: &mut Rng,
    v: &Vocab,
    props: &[String],
    interface: bool,
    s: &mut String,
) {
    let name = v.method(rng);
    let args: Vec<(String, &str)> = (0..rng.range(0, 3))
        .map(|_| (v.var(rng), *rng.pick(&TYPES)))
        .collect();
    let ret = *rng.pick(&TYPES);
    if rng.chance(0.6) {
        let _ = writeln!(s, "    /**\n     * {}.\n     *", v.sentence(rng, 5, 14));
        for (a, t) in &args {
            let _ = writeln!(s, "     * @param {t} ${a} {}", v.sentence(rng, 2, 7));
        }
        if rng.chance(0.3) {
            let _ = writeln!(
                s,
                "     *\n     * @throws {}Exception",
                pascal(&[v.word(rng)])
            );
        }
        s.push_str("     */\n");
    }
    let vis = if interface || rng.chance(0.6) {
        "public"
    } else if rng.chance(0.5) {
        "private"
    } else {
        "protected"
    };
    let _ = write!(s, "    {vis} function {name}(");
    for (i, (a, t)) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{t} ${a}");
        if rng.chance(0.2) {
            s.push_str(" = null");
        }
    }
    let _ = write!(s, "): {ret}");
    if interface {
        s.push_str(";\n");
        return;
    }
    s.push_str("\n    {\n");
    let mut locals: Vec<String> = args.iter().map(|(a, _)| a.clone()).collect();
    for _ in 0..rng.range(2, 9) {
        php_statement(rng, v, props, &mut locals, 2, s);
    }
    let r = if locals.is_empty() {
        format!("$this->{}", rng.pick(props))
    } else {
        format!("${}", rng.pick(&locals))
    };
    let _ = writeln!(s, "        return {r};\n    }}");
}

pub(super) fn php_expr(rng: &mut Rng, v: &Vocab, props: &[String], locals: &[String]) -> String {
    let operand = |rng: &mut Rng| -> String {
        if !locals.is_empty() && rng.chance(0.5) {
            format!("${}", rng.pick(locals))
        } else {
            format!("$this->{}", rng.pick(props))
        }
    };
    match rng.below(9) {
        0 => format!("$this->{}({})", v.method(rng), operand(rng)),
        1 => format!("{}->{}()", operand(rng), v.method(rng)),
        2 => format!("new {}({}, '{}')", v.class(rng), operand(rng), v.snake(rng)),
        3 => format!("{}['{}'] ?? {}", operand(rng), v.snake(rng), operand(rng)),
        4 => format!(
            "\\sprintf('{} \"%s\".', {})",
            v.sentence(rng, 3, 8),
            operand(rng)
        ),
        5 => format!(
            "array_map(static fn ($item) => $item->{}(), {})",
            v.method(rng),
            operand(rng)
        ),
        6 => format!("{}::{}({})", v.class(rng), v.method(rng), operand(rng)),
        7 => format!("{} + {}", operand(rng), rng.below(1000)),
        _ => format!("self::{}", v.snake(rng).to_uppercase()),
    }
}

pub(super) fn php_statement(
    rng: &mut Rng,
    v: &Vocab,
    props: &[String],
    locals: &mut Vec<String>,
    depth: usize,
    s: &mut String,
) {
    let ind = "    ".repeat(depth);
    let nested = depth < 4;
    match rng.below(12) {
        0..=2 => {
            let l = v.var(rng);
            let e = php_expr(rng, v, props, locals);
            let _ = writeln!(s, "{ind}${l} = {e};");
            locals.push(l);
        }
        3 if nested => {
            let e = php_expr(rng, v, props, locals);
            let _ = writeln!(s, "{ind}if (null === {e}) {{");
            let _ = writeln!(
                s,
                "{ind}    throw new {}Exception(\\sprintf('{} \"%s\" {}.', {}));",
                pascal(&[v.word(rng)]),
                v.sentence(rng, 2, 6),
                v.sentence(rng, 2, 6).to_lowercase(),
                php_expr(rng, v, props, locals)
            );
            let _ = writeln!(s, "{ind}}}\n");
        }
        4 if nested => {
            let item = v.var(rng);
            let _ = writeln!(
                s,
                "{ind}foreach ({} as $key => ${item}) {{",
                php_expr(rng, v, props, locals)
            );
            locals.push(item);
            for _ in 0..rng.range(1, 3) {
                php_statement(rng, v, props, locals, depth + 1, s);
            }
            let _ = writeln!(s, "{ind}}}");
        }
        5 if nested => {
            let _ = writeln!(
                s,
                "{ind}if (!isset(${}['{}'])) {{",
                locals.last().map_or("options", |l| l.as_str()),
                v.snake(rng)
            );
            php_statement(rng, v, props, locals, depth + 1, s);
            if rng.chance(0.4) {
                let _ = writeln!(s, "{ind}}} else {{");
                php_statement(rng, v, props, locals, depth + 1, s);
            }
            let _ = writeln!(s, "{ind}}}");
        }
        6 => {
            let _ = writeln!(s, "{ind}// {}.", v.sentence(rng, 4, 14));
        }
        7 => {
            let _ = writeln!(
                s,
                "{ind}$this->{}[{}] = {};",
                rng.pick(props),
                php_expr(rng, v, props, locals),
                php_expr(rng, v, props, locals)
            );
        }
        8 => {
            let l = v.var(rng);
            let _ = writeln!(s, "{ind}${l} = [");
            for _ in 0..rng.range(2, 6) {
                let _ = writeln!(
                    s,
                    "{ind}    '{}' => {},",
                    v.snake(rng),
                    php_expr(rng, v, props, locals)
                );
            }
            let _ = writeln!(s, "{ind}];");
            locals.push(l);
        }
        _ => {
            let _ = writeln!(
                s,
                "{ind}$this->{}({});",
                v.method(rng),
                php_expr(rng, v, props, locals)
            );
        }
    }
}

pub(super) fn author_name(rng: &mut Rng) -> String {
    pub(super) const FIRST: &[&str] = &[
        "Fabien",
        "Nicolas",
        "Tobias",
        "Christophe",
        "Jordi",
        "Marco",
        "Sebastian",
        "Taylor",
        "Kévin",
        "Ryan",
        "Javier",
        "Grégoire",
        "Alexander",
        "Jérémy",
        "Wouter",
        "Robin",
        "Anna",
        "Maria",
        "Yonel",
        "Titouan",
        "Oskar",
        "Mathias",
        "Hamza",
        "Jules",
        "Lukas",
        "Sara",
    ];
    pub(super) const LAST: &[&str] = &[
        "Potencier",
        "Grekas",
        "Nyholm",
        "Coevoet",
        "Boggiano",
        "Pivetta",
        "Bergmann",
        "Otwell",
        "Dunglas",
        "Weaver",
        "Eguiluz",
        "Pineau",
        "Schranz",
        "Derussé",
        "de Jong",
        "Chalas",
        "Müller",
        "Rossi",
        "Ceballos",
        "Wiesner",
        "Kowalski",
        "Frank",
        "Amrouche",
        "Martin",
    ];
    format!("{} {}", rng.pick(FIRST), rng.pick(LAST))
}

pub(super) fn twig_template(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::with_capacity(size + 256);
    let _ = writeln!(s, "{{% extends '{}/base.html.twig' %}}\n", v.word(rng));
    let _ = writeln!(
        s,
        "{{% block title %}}{{{{ '{}.{}'|trans }}}}{{% endblock %}}\n",
        v.word(rng),
        v.snake(rng)
    );
    while s.len() < size {
        let block = v.snake(rng);
        let _ = writeln!(s, "{{% block {block} %}}");
        let _ = writeln!(
            s,
            "    <div class=\"{}-{} {}\">",
            v.word(rng),
            v.word(rng),
            v.word(rng)
        );
        for _ in 0..rng.range(2, 8) {
            match rng.below(6) {
                0 => {
                    let item = v.word(rng);
                    let _ = writeln!(s, "        {{% for {item} in {}s %}}", v.word(rng));
                    let _ = writeln!(
                        s,
                        "            <li class=\"{}\"><a href=\"{{{{ path('{}_{}', {{id: {item}.id}}) }}}}\">{{{{ {item}.{} }}}}</a></li>",
                        v.word(rng),
                        v.word(rng),
                        v.word(rng),
                        v.var(rng)
                    );
                    let _ = writeln!(s, "        {{% else %}}\n            <li>{{{{ '{}'|trans }}}}</li>\n        {{% endfor %}}", v.snake(rng));
                }
                1 => {
                    let _ = writeln!(
                        s,
                        "        {{% if {}.{} is defined and {}.{} %}}\n            <span class=\"badge badge-{}\">{{{{ {}.{}|{} }}}}</span>\n        {{% endif %}}",
                        v.word(rng),
                        v.var(rng),
                        v.word(rng),
                        v.var(rng),
                        v.word(rng),
                        v.word(rng),
                        v.var(rng),
                        rng.pick(&["escape", "upper", "date('Y-m-d')", "format_currency('EUR')", "length", "raw"])
                    );
                }
                2 => {
                    let _ = writeln!(
                        s,
                        "        <p class=\"text-{}\">{}</p>",
                        v.word(rng),
                        v.sentence(rng, 6, 18)
                    );
                }
                3 => {
                    let _ = writeln!(
                        s,
                        "        {{{{ include('{}/_{}.html.twig', {{ {}: {} }}) }}}}",
                        v.word(rng),
                        v.snake(rng),
                        v.var(rng),
                        v.var(rng)
                    );
                }
                4 => {
                    let _ = writeln!(
                        s,
                        "        <button type=\"submit\" class=\"btn btn-{}\" data-action=\"{}#{}\">{{{{ '{}.{}'|trans }}}}</button>",
                        rng.pick(&["primary", "secondary", "danger", "link"]),
                        v.word(rng),
                        v.method(rng),
                        v.word(rng),
                        v.snake(rng)
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "        {{{{ form_row(form.{}, {{ label: '{}', attr: {{ class: '{}' }} }}) }}}}",
                        v.var(rng),
                        v.sentence(rng, 1, 4),
                        v.word(rng)
                    );
                }
            }
        }
        s.push_str("    </div>\n{% endblock %}\n\n");
    }
    s
}

pub(super) fn yaml_config(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::with_capacity(size + 128);
    while s.len() < size {
        let _ = writeln!(s, "{}:", v.snake(rng));
        for _ in 0..rng.range(2, 7) {
            match rng.below(4) {
                0 => {
                    let _ = writeln!(
                        s,
                        "    {}: '%env({})%'",
                        v.snake(rng),
                        v.snake(rng).to_uppercase()
                    );
                }
                1 => {
                    let _ = writeln!(s, "    {}:", v.snake(rng));
                    for _ in 0..rng.range(1, 4) {
                        let _ = writeln!(s, "        - {}", v.snake(rng));
                    }
                }
                2 => {
                    let _ = writeln!(
                        s,
                        "    {}: {}",
                        v.snake(rng),
                        rng.pick(&["true", "false", "null", "~"])
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "    {}: '{}\\{}'",
                        v.snake(rng),
                        pascal(&[v.word(rng)]),
                        v.class(rng)
                    );
                }
            }
        }
        s.push('\n');
    }
    s
}

pub(super) fn xliff(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::with_capacity(size + 256);
    s.push_str("<?xml version=\"1.0\"?>\n<xliff version=\"1.2\" xmlns=\"urn:oasis:names:tc:xliff:document:1.2\">\n    <file source-language=\"en\" datatype=\"plaintext\" original=\"file.ext\">\n        <body>\n");
    let mut id = 1;
    while s.len() < size {
        let src = v.sentence(rng, 3, 12);
        let _ = writeln!(
            s,
            "            <trans-unit id=\"{id}\">\n                <source>{src}.</source>\n                <target>{}.</target>\n            </trans-unit>",
            v.sentence(rng, 3, 12)
        );
        id += 1;
    }
    s.push_str("        </body>\n    </file>\n</xliff>\n");
    s
}

pub(super) fn markdown(rng: &mut Rng, v: &Vocab, title: &str, size: usize) -> String {
    let mut s = format!("{title}\n{}\n\n", "=".repeat(title.len()));
    while s.len() < size {
        match rng.below(5) {
            0 => {
                let _ = writeln!(s, "## {}\n", v.sentence(rng, 2, 5));
            }
            1 => {
                let _ = writeln!(
                    s,
                    "```php\n${} = new {}();\n${}->{}('{}');\n```\n",
                    v.var(rng),
                    v.class(rng),
                    v.var(rng),
                    v.method(rng),
                    v.snake(rng)
                );
            }
            2 => {
                for _ in 0..rng.range(2, 5) {
                    let _ = writeln!(s, " * {}", v.sentence(rng, 4, 12));
                }
                s.push('\n');
            }
            _ => {
                let _ = writeln!(
                    s,
                    "{}. {}.\n",
                    v.sentence(rng, 8, 20),
                    v.sentence(rng, 6, 16)
                );
            }
        }
    }
    s
}

pub(super) fn changelog(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::from("CHANGELOG\n=========\n\n");
    let mut major = rng.range(2, 7);
    let mut minor = 4;
    while s.len() < size {
        let _ = writeln!(s, "{major}.{minor}\n---\n");
        for _ in 0..rng.range(2, 7) {
            let _ = writeln!(
                s,
                " * {} `{}::{}()` {}",
                rng.pick(&["Add", "Deprecate", "Remove", "Fix", "Allow"]),
                v.class(rng),
                v.method(rng),
                v.sentence(rng, 3, 10).to_lowercase()
            );
        }
        s.push('\n');
        if minor == 0 {
            major -= 1;
            minor = 4;
        } else {
            minor -= 1;
        }
        if major == 0 {
            break;
        }
    }
    s
}

pub(super) const MIT: &str = include_str!("words/license-mit.txt");

pub(super) fn composer_json(rng: &mut Rng, v: &Vocab, name: &str, namespace: &str) -> String {
    let mut s = format!(
        "{{\n    \"name\": \"{name}\",\n    \"type\": \"library\",\n    \"description\": \"{}\",\n    \"keywords\": [",
        v.sentence(rng, 4, 10)
    );
    for i in 0..rng.range(1, 5) {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "\"{}\"", v.word(rng));
    }
    let _ = write!(
        s,
        "],\n    \"homepage\": \"https://{}.example.org\",\n    \"license\": \"MIT\",\n    \"authors\": [\n        {{\n            \"name\": \"{}\",\n            \"email\": \"{}@example.org\"\n        }}\n    ],\n    \"require\": {{\n        \"php\": \">=8.1\"",
        name.replace('/', "-"),
        author_name(rng),
        v.word(rng)
    );
    for _ in 0..rng.range(0, 6) {
        let _ = write!(
            s,
            ",\n        \"{}/{}\": \"^{}.{}\"",
            rng.pick(&VENDORS),
            v.word(rng),
            rng.range(1, 7),
            rng.range(0, 4)
        );
    }
    let _ = write!(
        s,
        "\n    }},\n    \"autoload\": {{\n        \"psr-4\": {{ \"{}\\\\\": \"src/\" }},\n        \"exclude-from-classmap\": [\n            \"/Tests/\"\n        ]\n    }},\n    \"minimum-stability\": \"dev\"\n}}\n",
        namespace.replace('\\', "\\\\")
    );
    s
}

/// One line of minified JavaScript-like tokens.
pub(super) fn minified_js(rng: &mut Rng, v: &Vocab, size: usize) -> Vec<u8> {
    let mut s = String::with_capacity(size + 256);
    s.push_str("/*! For license information please see app.js.LICENSE.txt */\n");
    let ids: Vec<String> = (0..60)
        .map(|i| {
            let a = (b'a' + (i % 26) as u8) as char;
            if i < 26 {
                a.to_string()
            } else {
                format!("{a}{}", (b'A' + (i / 26) as u8) as char)
            }
        })
        .collect();
    let mut module = rng.range(1000, 9000);
    while s.len() < size {
        module += rng.range(1, 40);
        let _ = write!(s, "{module}:function(e,t,n){{\"use strict\";");
        for _ in 0..rng.range(3, 14) {
            let a = rng.pick(&ids);
            let b = rng.pick(&ids);
            match rng.below(7) {
                0 => {
                    let _ = write!(s, "var {a}=n({});", rng.range(1000, 9999));
                }
                1 => {
                    let _ = write!(
                        s,
                        "{a}.{}=function({b}){{return this.{}({b})}};",
                        v.method(rng),
                        v.var(rng)
                    );
                }
                2 => {
                    let _ = write!(
                        s,
                        "if(!{a}||{a}.length<{})throw new Error(\"{}\");",
                        rng.below(64),
                        v.sentence(rng, 2, 6)
                    );
                }
                3 => {
                    let _ = write!(
                        s,
                        "for(var {a}=0;{a}<{b}.length;{a}++){b}[{a}]&&{b}[{a}].{}();",
                        v.method(rng)
                    );
                }
                4 => {
                    let _ = write!(
                        s,
                        "{a}={{{}:\"{}\",{}:{},{}:!0}};",
                        v.var(rng),
                        v.snake(rng),
                        v.var(rng),
                        rng.below(10000),
                        v.var(rng)
                    );
                }
                5 => {
                    let _ = write!(s, "Object.defineProperty({a},\"{}\",{{enumerable:!0,get:function(){{return {b}.{}}}}});", v.var(rng), v.var(rng));
                }
                _ => {
                    let _ = write!(
                        s,
                        "{a}.prototype.{}=function({b},{}){{return {b}?{}:void 0}};",
                        v.method(rng),
                        rng.pick(&ids),
                        rng.pick(&ids)
                    );
                }
            }
        }
        s.push_str("},");
    }
    s.push('\n');
    s.into_bytes()
}

pub(super) fn minified_css(rng: &mut Rng, v: &Vocab, size: usize) -> Vec<u8> {
    pub(super) const PROPS: &[&str] = &[
        "display:flex",
        "display:block",
        "display:none",
        "position:relative",
        "position:absolute",
        "margin:0",
        "padding:0 .5rem",
        "padding:.375rem .75rem",
        "font-weight:600",
        "line-height:1.5",
        "border:1px solid transparent",
        "border-radius:.25rem",
        "text-decoration:none",
        "cursor:pointer",
        "overflow:hidden",
        "width:100%",
        "align-items:center",
        "justify-content:space-between",
        "flex-wrap:wrap",
        "z-index:1000",
        "transition:color .15s ease-in-out,background-color .15s ease-in-out",
    ];
    let mut s = String::with_capacity(size + 256);
    s.push_str("@charset \"UTF-8\";");
    while s.len() < size {
        let _ = write!(s, ".{}-{}", v.word(rng), v.word(rng));
        if rng.chance(0.4) {
            let _ = write!(
                s,
                ":{}",
                rng.pick(&["hover", "focus", "active", "not(:disabled)", "first-child"])
            );
        }
        s.push('{');
        for i in 0..rng.range(1, 6) {
            if i > 0 {
                s.push(';');
            }
            if rng.chance(0.35) {
                let _ = write!(s, "color:#{:06x}", rng.next_u64() & 0xff_ffff);
            } else {
                s.push_str(rng.word(PROPS));
            }
        }
        s.push('}');
        if rng.chance(0.05) {
            let _ = write!(
                s,
                "@media (min-width:{}px){{",
                rng.pick(&[576, 768, 992, 1200, 1400])
            );
            let _ = write!(
                s,
                ".{}-{}{{{}}}}}",
                v.word(rng),
                rng.pick(&["sm", "md", "lg", "xl"]),
                rng.pick(PROPS)
            );
        }
    }
    s.push('\n');
    s.into_bytes()
}

/// An "image": a real signature and header-ish prefix, then incompressible bytes.
pub(super) fn image(rng: &mut Rng, ext: &str, size: usize) -> Vec<u8> {
    let mut v = match ext {
        "png" => b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
        "jpg" => b"\xff\xd8\xff\xe0\0\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0".to_vec(),
        "woff2" => b"wOF2\0\x01\0\0".to_vec(),
        _ => b"GIF89a".to_vec(),
    };
    v.extend(rng.bytes(size.saturating_sub(v.len())));
    v
}

pub(super) fn svg(rng: &mut Rng, size: usize) -> String {
    let mut s = String::from("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 512 512\">");
    while s.len() < size {
        let _ = write!(
            s,
            "<path fill=\"#{:06x}\" d=\"M",
            rng.next_u64() & 0xff_ffff
        );
        for _ in 0..rng.range(4, 20) {
            let _ = write!(
                s,
                "{}.{} {}.{}{}",
                rng.below(512),
                rng.below(100),
                rng.below(512),
                rng.below(100),
                rng.pick(&["L", "C", "l", "c", "H", "V", "z"])
            );
        }
        s.push_str("\"/>");
    }
    s.push_str("</svg>\n");
    s
}
