// The engine: plain Kotlin/JVM, no Android imports. It compiles against the desktop onnxruntime artifact (the same
// ai.onnxruntime API); the app brings onnxruntime-android at runtime instead.
plugins {
    id("org.jetbrains.kotlin.jvm")
}

val onnxruntimeVersion = "1.29.0" // = android-demo/pom.xml and pyproject.toml

java {
    sourceCompatibility = JavaVersion.VERSION_1_8
    targetCompatibility = JavaVersion.VERSION_1_8
}

kotlin {
    compilerOptions {
        jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_1_8)
    }
}

dependencies {
    compileOnly("com.microsoft.onnxruntime:onnxruntime:$onnxruntimeVersion")
    testImplementation("com.microsoft.onnxruntime:onnxruntime:$onnxruntimeVersion")
    testImplementation("junit:junit:4.13.2")
}
